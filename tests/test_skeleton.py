"""The package skeleton: CLI wiring, fast --help, atomic writes, the manifest and prompt contracts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.data.manifest import Manifest, concat_manifests, load_manifest, write_manifest
from lesiongen.data.prompts import load_prompts
from lesiongen.errors import InputError, OutputExistsError
from lesiongen.utils.atomic import atomic_path, ensure_writable, write_json

runner = CliRunner()


def test_help_lists_every_command_group():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for command in ("data", "base", "train-classifier", "evaluate", "finetune", "generate", "export",
                    "mine-and-generate", "evaluate-synthetic", "loop", "report", "demo"):
        assert command in result.output


def test_cli_import_does_not_load_heavy_libraries():
    code = ("import sys, lesiongen.cli.app; "
            "print(sorted(m for m in ('torch','diffusers','timm','pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "lesiongen", "version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "result.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert target.stat().st_mode & 0o044 == 0o044  # readable by others, like any file the user writes


def test_ensure_writable_refuses_existing_output(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("result")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        ensure_writable(tmp_path / "out", overwrite=False)
    ensure_writable(tmp_path / "out", overwrite=True)


def _write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_manifest_round_trip_keeps_root_and_class_order(tmp_path):
    rows = [{"image": "images/a.png", "label": "nv", "split": "train", "group_id": "L1"},
            {"image": "images/b.png", "label": "mel", "split": "val", "group_id": "L2"}]
    m = Manifest(pd.DataFrame(rows), tmp_path / "data", ["mel", "nv"])
    path = write_manifest(m, tmp_path / "runs" / "manifest.csv")
    loaded = load_manifest(path)
    assert loaded.root.resolve() == (tmp_path / "data").resolve()
    assert loaded.classes == ["mel", "nv"]
    assert loaded.label_indices() == [1, 0]
    assert loaded.split("val").df["image"].tolist() == ["images/b.png"]
    with pytest.raises(InputError, match="no rows in split 'test'"):
        loaded.split("test")
    other = Manifest(pd.DataFrame(rows[:1]), tmp_path / "synthetic", ["mel", "nv"])
    merged = concat_manifests([loaded, other])
    assert merged.root == tmp_path.resolve()
    assert merged.df["image"].tolist() == ["data/images/a.png", "data/images/b.png", "synthetic/images/a.png"]
    reloaded = load_manifest(write_manifest(merged, tmp_path / "elsewhere" / "merged.csv"))
    assert reloaded.image_paths()[-1] == tmp_path.resolve() / "synthetic/images/a.png"


@pytest.mark.parametrize("rows, message", [
    ([{"image": "a.png", "label": "nv", "split": "train"}], "missing required column"),
    ([{"image": "../a.png", "label": "nv", "split": "train", "group_id": "1"}], "escapes the data root"),
    ([{"image": "/etc/a.png", "label": "nv", "split": "train", "group_id": "1"}], "escapes the data root"),
    ([{"image": "a.png", "label": "nv", "split": "holdout", "group_id": "1"}], "row 2, column 'split'"),
    ([{"image": "a.png", "label": "nv", "split": "train", "group_id": "1"},
      {"image": "a.png", "label": "nv", "split": "train", "group_id": "1"}], "row 3: image 'a.png' is listed twice"),
])
def test_manifest_errors_name_the_offender(tmp_path, rows, message):
    path = _write_csv(tmp_path / "m.csv", rows)
    with pytest.raises(InputError, match=message) as info:
        load_manifest(path)
    assert str(path) in str(info.value)


def test_manifest_unknown_label_names_row(tmp_path):
    path = _write_csv(tmp_path / "m.csv", [{"image": "a.png", "label": "zebra", "split": "train", "group_id": "1"}])
    with pytest.raises(InputError, match="row 2, column 'label': unknown label 'zebra'"):
        load_manifest(path, classes=["mel", "nv"])


def test_manifest_non_utf8_is_a_clear_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("image,label,split,group_id\nb\xe9.png,nv,train,1\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8"):
        load_manifest(path)


def test_shipped_prompt_files_validate():
    ham = load_prompts("ham10000")
    assert ham.class_names == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert ham.class_prompt("mel").startswith("a dermoscopy image of <derm-mel>")
    caption = ham.caption("nv", {"localization": "back", "age": "45.0", "sex": "male"}, template_index=3)
    assert caption == "dermoscopy of <derm-nv> melanocytic nevus, male patient aged 45"
    assert "{site}" not in ham.caption("nv", {}, template_index=2)  # falls back to a usable template
    assert len(load_prompts("isic2019").classes) == 8


def test_shipped_prompts_load_from_a_source_tree(monkeypatch):
    """Run from a checkout on PYTHONPATH (no install, so no `lesiongen.prompts` mapping), the checkout's
    prompts/ folder serves the same files."""
    from lesiongen.data import prompts as prompts_module

    def not_installed(package):
        raise ModuleNotFoundError(f"No module named '{package}'")

    installed = load_prompts("ham10000")
    monkeypatch.setattr(prompts_module.resources, "files", not_installed)
    assert prompts_module._shipped_prompt_folder() == Path(prompts_module.__file__).parents[2] / "prompts"
    from_checkout = load_prompts("ham10000")
    assert from_checkout.classes == installed.classes and from_checkout.templates == installed.templates
    with pytest.raises(InputError, match="isic2019"):
        load_prompts("no-such-dataset")


def test_prompt_file_errors_name_the_class(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("classes:\n  mel: {name: melanoma, token: 'MEL', init_words: [melanoma]}\n")
    with pytest.raises(InputError, match="class 'mel': token 'MEL'"):
        load_prompts(bad)
    bad.write_text("classes:\n  mel: {name: melanoma, token: '<m>', init_words: [x]}\n"
                   "templates: ['{token} on {planet}']\n")
    with pytest.raises(InputError, match="unknown field"):
        load_prompts(bad)
    bad.write_text("classes:\n  mel: {name: melanoma, token: '<m>', init_words: [x], descripton: y}\n"
                   "negative_promt: blurry\n")
    with pytest.raises(InputError, match=r"unknown key\(s\) \['negative_promt'\] \(did you mean 'negative_prompt'\?\)"):
        load_prompts(bad)
    bad.write_text("classes:\n  mel: {name: melanoma, token: '<m>', init_words: [x], descripton: y}\n")
    with pytest.raises(InputError, match=r"class 'mel': unknown key\(s\) \['descripton'\]"):
        load_prompts(bad)


def test_every_subpackage_is_listed_in_pyproject():
    """A package missing from pyproject's explicit list works editable but vanishes from a wheel."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "lesiongen").rglob("__init__.py")}
    assert found - listed == set()


def test_overwrite_replaces_only_output_folders_of_the_same_kind(tmp_path):
    from lesiongen.utils.outdir import check_out_dir, check_replaceable, write_marker

    data = tmp_path / "data"  # a data set: --overwrite must never delete it
    (data / "images").mkdir(parents=True)
    (data / "labels.csv").write_text("image,label\n")
    with pytest.raises(OutputExistsError, match=r"data is not an evaluation output folder made by lesiongen "
                                                r"\(it holds images/, labels.csv\).*remove it yourself"):
        check_replaceable(data, "evaluation", overwrite=True)
    assert (data / "labels.csv").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="--out .*file is a file; expected a folder"):
        check_out_dir(tmp_path / "file", "loop")
    made = tmp_path / "made"
    made.mkdir()
    (made / "metrics.json").write_text("{}")
    write_marker(made, "evaluation")
    with pytest.raises(OutputExistsError, match="it is an evaluation output"):
        check_out_dir(made, "classifier")
    assert check_replaceable(made, "evaluation", overwrite=True) == made
    legacy = tmp_path / "legacy"  # made before the marker: known by its signature files
    legacy.mkdir()
    (legacy / "classifier.json").write_text("{}")
    assert check_out_dir(legacy, "classifier") == "own"
    assert check_out_dir(tmp_path / "new", "classifier") == "missing"


def test_resume_refuses_another_commands_folder_before_reading_its_config(tmp_path, capsys):
    """`--resume latest` on a classifier folder given to finetune (and so on) names what the folder is,
    instead of listing the other command's config keys as unknown ones."""
    from lesiongen.cli.classifier import resolve_train_config
    from lesiongen.diffusion.finetune import resolve_config as resolve_finetune
    from lesiongen.diffusion.pretrain.run import resolve_config as resolve_pretrain
    from lesiongen.utils.outdir import write_marker

    folders = {}
    for kind, keys in (("classifier", "arch: resnet18\nepochs: 3\n"), ("finetune", "method: lora\nsteps: 4\n")):
        folders[kind] = tmp_path / kind
        folders[kind].mkdir()
        (folders[kind] / "config.yaml").write_text(keys)
        write_marker(folders[kind], kind, complete=False)
    calls = {
        "finetune": lambda out: resolve_finetune({"base": "b", "manifest": "m", "out": str(out)}, resume="latest"),
        "base pretraining": lambda out: resolve_pretrain(None, {}, out, "latest"),
        "classifier training": lambda out: resolve_train_config(None, {"manifest": "m"}, out, "latest"),
    }
    for title, call in calls.items():
        other = folders["finetune" if title != "finetune" else "classifier"]
        with pytest.raises(OutputExistsError, match=f"is not an? {title} output folder made by lesiongen") as err:
            call(other)
        assert "unknown key" not in str(err.value)
        capsys.readouterr()
        call(tmp_path / "mistyped")  # nothing to resume: a new run, said out loud
        assert f"mistyped holds no {title} run to resume; starting a new one there" in capsys.readouterr().err


def test_a_failed_start_removes_what_it_created_unless_resumable(tmp_path):
    from lesiongen.utils.outdir import OutputFolder, is_unfinished

    def fail(folder: OutputFolder, resumable: bool) -> None:
        with pytest.raises(RuntimeError), folder.removed_on_failure(lambda path: (path / "checkpoint").exists()):
            folder.start()
            assert is_unfinished(folder.path)
            (folder.path / ("checkpoint" if resumable else "config.yaml")).write_text("x")
            raise RuntimeError("bad input found late")

    fail(OutputFolder(tmp_path / "new", "finetune"), resumable=False)
    assert not (tmp_path / "new").exists()  # the corrected rerun starts afresh
    fail(OutputFolder(tmp_path / "kept", "finetune"), resumable=True)
    assert (tmp_path / "kept" / "checkpoint").is_file()  # resumable work is never removed
    (tmp_path / "empty").mkdir()
    fail(OutputFolder(tmp_path / "empty", "finetune"), resumable=False)
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())  # the user's folder stays


def test_overwrite_keeps_the_result_it_replaces_until_the_new_one_stands(tmp_path):
    """A bad input found after an --overwrite start (an unreadable image an hour in) gives the old result back;
    a new run that is resumable or finished replaces it for good."""
    from lesiongen.utils.outdir import OutputFolder, mark_complete, replaced_path

    out = tmp_path / "hard"

    def finished(text: str) -> None:
        folder = OutputFolder(out, "mine-and-generate")
        with folder.removed_on_failure():
            folder.start(replace=True)
            (out / "manifest.csv").write_text(text)
        folder.finish()

    def overwrite_failing(resumable: bool) -> None:
        folder = OutputFolder(out, "mine-and-generate")
        with pytest.raises(RuntimeError), folder.removed_on_failure(lambda path: (path / "records").is_dir()):
            folder.start(replace=True)
            assert not (out / "manifest.csv").exists() and replaced_path(out).is_dir()
            (out / ("records" if resumable else "config.yaml")).mkdir()
            raise RuntimeError("train image 7 is unreadable")

    finished("old")
    overwrite_failing(resumable=False)
    assert (out / "manifest.csv").read_text() == "old" and not replaced_path(out).exists()
    overwrite_failing(resumable=True)  # the new run is under way: resuming it is the way on
    assert (out / "records").is_dir() and not (out / "manifest.csv").exists() and not replaced_path(out).exists()
    finished("old")
    # killed during an --overwrite: the older finished result waits aside, and a later --overwrite keeps it
    OutputFolder(out, "mine-and-generate").start(replace=True)
    (out / "config.yaml").write_text("half")
    overwrite_failing(resumable=False)
    assert (out / "manifest.csv").read_text() == "old" and not replaced_path(out).exists()
    finished("new")
    assert (out / "manifest.csv").read_text() == "new" and not replaced_path(out).exists()
    # killed during an --overwrite, then resumed to the end: the resumed result is the one a later failure keeps
    OutputFolder(out, "mine-and-generate").start(replace=True)
    (out / "manifest.csv").write_text("resumed")
    mark_complete(out)  # what the resumed run does when it finishes
    assert not replaced_path(out).exists()
    overwrite_failing(resumable=False)
    assert (out / "manifest.csv").read_text() == "resumed"
