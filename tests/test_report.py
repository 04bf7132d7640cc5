"""`lesiongen report`: the tables match the run's metrics files; the HTML is self-contained and renders
in headless Chromium with every image loaded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.report.document import Callout, Document, Figure, Heading, Table, to_html, to_markdown

CHROMIUM_INSTALL = "apt-get install -y chromium"
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const images = [...document.images].map(i => ({complete: i.complete, width: i.naturalWidth}));
  const out = document.createElement('pre');
  out.id = 'lesiongen-check';
  out.textContent = JSON.stringify({images, height: document.body.scrollHeight, title: document.title});
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip(f"headless Chromium is not installed (Debian: `{CHROMIUM_INSTALL}`)")


def render_in_chromium(html_file: Path, work: Path) -> dict:
    """Load a copy of the page (with a checking script appended) in headless Chromium; return what the
    page saw once loaded: every <img>'s `complete` and `naturalWidth`, the body height, the title."""
    page = work / "page.html"
    page.write_text(html_file.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"),
                    encoding="utf-8")
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={work / 'profile'}",
               "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="lesiongen-check">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the page did not finish loading in Chromium (exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def _table_rows(markdown: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table whose header row starts with `header_start`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)))
    return rows


def _fmt_ci(value: float, ci: list[float] | None) -> str:
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def test_report_table_matches_metrics_files(tiny_loop_run, tmp_path):
    run_dir = tiny_loop_run.run_dir
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    rows = _table_rows(markdown, "arm | round | seeds")
    seen = set()
    for metrics_file in sorted(run_dir.glob("seed-0/round-*/*/eval-test/metrics.json")):
        arm, round_ = metrics_file.parts[-3], metrics_file.parts[-4].removeprefix("round-")
        metrics = json.loads(metrics_file.read_text())
        row = next(r for r in rows if r["arm"] == arm and r["round"] == round_)
        for key, title in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                           ("mel_sensitivity@specificity=0.90", "mel sensitivity @ 0.90 specificity (test ROC)"),
                           ("mel_sensitivity@val_threshold(specificity=0.90)",
                            "mel sensitivity at val's 0.90-spec. threshold"),
                           ("mel_specificity@val_threshold(specificity=0.90)", "mel specificity there"),
                           ("macro_auroc", "macro AUROC")):
            assert row[title] == _fmt_ci(metrics["metrics"][key], metrics["ci95"].get(key)), (arm, round_, key)
        if arm != "real":
            compare = json.loads((metrics_file.parent.parent / "compare-test" / "compare.json").read_text())
            diff = compare["metrics"]["balanced_accuracy"]
            ci = diff["ci95"]
            assert row["Δ balanced accuracy vs real"] == f"{diff['difference']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        seen.add((arm, round_))
    assert {"real", "mined", "classical", "random"} <= {arm for arm, _ in seen}
    selection = _table_rows(markdown, "model | selected on | val images selecting it")
    for info_file in sorted(run_dir.glob("seed-0/round-*/*/train/classifier.json")):
        arm, round_ = info_file.parts[-3], info_file.parts[-4].removeprefix("round-")
        training = json.loads(info_file.read_text())["training"]
        every = json.loads((info_file.parent / "eval-val" / "metrics.json").read_text())["metrics"]
        row = next(r for r in selection if r["model"] == f"{arm} r{round_}")
        assert row["selected on"] == training["selection"]["rule"] == "all"
        assert row["val images selecting it"] == str(training["selection"]["rows"])
        assert row["val lesions that synthetic images came from"] == str(training["selection"]["source_lesions"])
        assert row["val bal. acc. (selection)"] == f"{training['val_balanced_accuracy']:.3f}"
        assert row["val bal. acc. (all val images)"] == f"{every['balanced_accuracy']:.3f}"
        unseen = training["val_unseen_balanced_accuracy"]
        assert row["val bal. acc. (lesions no synthetic image came from)"] == (
            f"{unseen:.3f}" if unseen is not None else "= all")
        assert (training["selection"]["source_lesions"] > 0) == (arm in ("mined", "classical"))
    assert "DEMONSTRATION" in markdown  # the toy-data run says what it is
    for asset in re.findall(r"\]\((report_assets/[^)]+)\)", markdown):
        assert (run_dir / asset).is_file()


def test_report_html_is_self_contained_and_renders(tiny_loop_run, tmp_path):
    run_dir = tiny_loop_run.run_dir
    CliRunner().invoke(app, ["report", str(run_dir)])
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(sources) >= 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(https?:|//|file:)', html)
    seen = render_in_chromium(run_dir / "report.html", tmp_path)
    assert len(seen["images"]) == len(sources)
    assert all(image["complete"] and image["width"] > 0 for image in seen["images"]), seen["images"]
    assert seen["height"] > 1000 and seen["title"].startswith("lesiongen report")


def test_document_renders_escaped_markdown_and_html():
    import numpy as np

    from lesiongen.report.figures import image_grid

    png = image_grid([[np.zeros((8, 8, 3), np.uint8), None]], ["row <1>"], ["a", "b"])
    doc = Document("t <&>").add(Callout("leak", "warning"), Heading("h"),
                                Table(["a|b", "c"], [["1", "<x>"]]), Figure("fig", png, "cap"))
    markdown, html = to_markdown(doc, "assets"), to_html(doc)
    assert "> **WARNING:** leak" in markdown and "| a\\|b | c |" in markdown
    assert "![fig](assets/fig.png)" in markdown and "*cap*" in markdown
    assert "<h1>t &lt;&amp;&gt;</h1>" in html and "&lt;x&gt;" in html and 'class="callout warning"' in html
    assert html.count("data:image/png;base64,") == 1


def test_report_of_a_folder_that_is_not_a_run(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a loop run folder" in result.output
    clf = tmp_path / "clf"  # a classifier folder: a config.yaml too, but of train-classifier
    clf.mkdir()
    (clf / "config.yaml").write_text("arch: test_efficientnet\nepochs: 1\n")
    (clf / "classifier.json").write_text("{}")
    result = CliRunner(env={"COLUMNS": "2000"}).invoke(app, ["report", str(clf)])
    assert result.exit_code == 2, result.output
    assert "is not a loop run folder" in result.output and "a classifier folder" in result.output
    assert "unknown key" not in result.output


def test_report_of_a_run_with_an_unreadable_summary_reads_the_stage_folders(tiny_loop_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_loop_run.run_dir, run_dir, ignore=shutil.ignore_patterns("report*"))
    CliRunner().invoke(app, ["report", str(run_dir)])
    intact = (run_dir / "report.md").read_text(encoding="utf-8")
    summary = run_dir / "metrics.json"
    summary.write_text(summary.read_text()[:300])  # cut short
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"WARNING: {summary} is unreadable (not valid JSON" in result.output
    assert (run_dir / "report.md").read_text(encoding="utf-8") == intact  # the same numbers, from their sources


def test_report_of_a_run_killed_before_its_data_stage_says_how_to_continue(tiny_loop_run, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("config.yaml", "state.json", ".lesiongen.json"):
        shutil.copy(tiny_loop_run.run_dir / name, run_dir / name)
    (run_dir / "state.json").write_text(json.dumps({**json.loads((run_dir / "state.json").read_text()),
                                                    "finished": {}}))
    result = CliRunner(env={"COLUMNS": "2000"}).invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert "has not finished its data stage" in result.output and f"lesiongen loop --resume {run_dir}" in result.output


def test_report_of_a_test_mining_run_leads_with_the_leakage_warning(tiny_loop_run, tmp_path):
    import yaml

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_loop_run.run_dir, run_dir, ignore=shutil.ignore_patterns("metrics.json", "report*"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["mining"].update(split="test", allow_test_mining=True)
    config["classifier"]["synthetic_splits"] = ["train", "val", "test"]  # what such a run trains on
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    first_block = markdown.split("\n\n")[1]
    assert first_block.startswith("> **WARNING:** LEAKAGE") and "TEST split" in first_block
    assert "WARNING: LEAKAGE" in (run_dir / "report.html").read_text(encoding="utf-8")


def test_quality_table_shows_each_distance_from_quality_json():
    """Values come from the stage's quality.json as written; a missing one reads n/a."""
    from lesiongen.report.build import _quality_table
    from lesiongen.report.tables import Results

    quality = {"overall": {"domain": {"fid": 12.5, "fd_inf": 0.49, "kid_mean": 0.00037,
                                      "prdc": {"precision": 0.8, "recall": 0.81, "density": 0.96, "coverage": 0.97}}},
               "class_fidelity": {"synthetic": {"overall": 0.7}, "real_reference": {"overall": 0.75}},
               "memorization": {"n_flagged": 2}, "images": {"synthetic": {"n_images": 1300}}}
    table = _quality_table(Results({"models": [{"arm": "mined", "round": 1, "seed": 0, "quality": quality}]}))
    row = dict(zip(table.header, table.rows[0]))
    assert row["FD (domain)"] == "12.50" and row["FD∞ (domain)"] == "0.49" and row["KID (domain)"] == "0.0004"
    assert row["FID (Inception)"] == "n/a" and row["class fidelity"] == "0.70 / 0.75"
    assert row["precision / recall / density / coverage"] == "0.80 / 0.81 / 0.96 / 0.97"


def test_arms_short_of_the_mined_counts_are_named_with_their_counts():
    from lesiongen.report.tables import Results, budget_gaps

    def model(arm: str, seed: int, used: dict) -> dict:
        return {"arm": arm, "round": 0 if arm == "real" else 1, "seed": seed, "test": {"metrics": {}},
                "synthetic_used": used}

    models = [model("real", 0, {}), model("mined", 0, {"bcc": 10, "df": 4}), model("mined", 1, {"bcc": 12, "df": 4}),
              model("classical", 0, {"bcc": 10, "df": 4}), model("classical", 1, {"bcc": 12, "df": 4}),
              model("random", 0, {"bcc": 2, "df": 4}), model("random", 1, {"bcc": 3})]
    gaps = budget_gaps(Results({"models": models}), ["bcc", "df"])
    assert gaps == {"random": {"bcc": (2.5, 11.0)}}  # df: 4 in the one seed that has it, as in mined


@pytest.mark.parametrize("epoch_length, says", [
    ("all", "also takes more optimizer steps than the real-only classifier"),
    ("real", "all arms take the same optimizer steps"),
])
def test_report_says_whether_the_arms_took_equal_steps(tiny_loop_run, tmp_path, epoch_length, says):
    import yaml

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_loop_run.run_dir, run_dir, ignore=shutil.ignore_patterns("metrics.json", "report*"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["classifier"]["epoch_length"] = epoch_length
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert says in (run_dir / "report.md").read_text(encoding="utf-8")


def test_report_says_when_every_arm_was_selected_on_the_selection_reserve(tiny_loop_run, tmp_path):
    """The wording follows the run's rule; the run itself (rule `all`) is copied, its config switched."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_loop_run.run_dir, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["classifier"].update(selection="reserved", selection_reserve=0.25)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    markdown = " ".join((run_dir / "report.md").read_text(encoding="utf-8").split())
    assert "over the selection reserve: 0.25 of the validation lesions per class, never mined" in markdown
    assert "no arm trained on variants of these never-mined images" in markdown


def _copy_run(tiny_loop_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_loop_run.run_dir, run_dir, ignore=shutil.ignore_patterns("report*"))
    return run_dir


def test_report_names_a_damaged_stage_file_when_it_reads_the_stage_folders(tiny_loop_run, tmp_path):
    run_dir = _copy_run(tiny_loop_run, tmp_path)
    (run_dir / "metrics.json").unlink()  # the report then reads the stage folders
    damaged = next(run_dir.glob("seed-0/round-1/mined/eval-test/metrics.json"))
    damaged.write_text(damaged.read_text()[:200])
    result = CliRunner(env={"COLUMNS": "2000"}).invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert f"{damaged}: not valid JSON" in " ".join(result.output.split())
    assert not (run_dir / "report.md").exists()


def test_report_refuses_an_incomplete_summary_or_saved_config(tiny_loop_run, tmp_path):
    run_dir = _copy_run(tiny_loop_run, tmp_path)
    (run_dir / "metrics.json").write_text('{"classes": ["akiec"]}')  # valid JSON, not a summary
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "is unreadable (not a run summary)" in result.output
    (run_dir / "config.yaml").write_text("")  # would be read as the built-in defaults
    result = CliRunner(env={"COLUMNS": "2000"}).invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert "not a complete saved run config" in result.output
    assert yaml.safe_load((tiny_loop_run.run_dir / "config.yaml").read_text())["name"] == "tiny-loop-test"


def test_report_clears_figures_an_earlier_report_drew(tiny_loop_run):
    run_dir = tiny_loop_run.run_dir
    assets = run_dir / "report_assets"
    assets.mkdir(exist_ok=True)
    (assets / "round-9-arm-gone.png").write_bytes(b"an old figure")
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    markdown = (run_dir / "report.md").read_text(encoding="utf-8")
    drawn = {Path(asset).name for asset in re.findall(r"\]\(report_assets/([^)]+)\)", markdown)}
    assert drawn and {p.name for p in assets.glob("*.png")} == drawn
