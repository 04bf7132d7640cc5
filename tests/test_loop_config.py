"""The loop's config (validated early, saved resolved), its stage plan, and the classical-augmentation arm."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.config import shipped_config
from lesiongen.errors import InputError
from lesiongen.loop.config import (
    ClassicalConfig,
    absolute_paths,
    check_finetune_resolution,
    config_yaml,
    load_loop_config,
    load_resolved,
    parse_set_options,
)
from lesiongen.loop.layout import ModelKey, RunLayout
from lesiongen.loop.plan import build_plan, models

SHIPPED = ("demo", "derm-dev-small", "ham10000-sd15", "isic2019-sd15")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    config = load_loop_config(shipped_config(name))
    saved = tmp_path / "config.yaml"
    saved.write_text(config_yaml(config))
    again = load_resolved(saved)
    assert config_yaml(again) == config_yaml(config)  # the resolved config reloads to itself


def test_seeds_count_and_canonical_arm_order():
    config = load_loop_config(None, {"seeds": 3, "arms": ["mined", "random", "real"]})
    assert config.seeds == [0, 1, 2] and config.arms == ["real", "random", "mined"]


@pytest.mark.parametrize("overrides, message", [
    ({"classifer": {}}, "unknown key(s) ['classifer']"),
    ({"classifier": {"epochs": 0}}, "epochs must be a positive integer"),
    ({"classifier": {"manifest": "m.csv"}}, "classifier.manifest is set by the loop"),
    ({"base": {"pretrain": {"prompts": "x"}}}, "base.pretrain.prompts is set by the loop"),
    ({"synthesis": {"variants": {"strength": 1.5}}}, "--set synthesis.variants.strength: strength must be in (0, 1]"),
    ({"synthesis": {"out": "x"}}, "synthesis.out is set by the loop"),
    ({"rare_classes": {"xyz": 5}}, "rare_classes names unknown class(es) ['xyz']"),
    ({"mining": {"per_class_quota": {"mle": 3}}},
     "--set mining.per_class_quota: mining.per_class_quota names unknown class(es) ['mle']"),
    ({"mining": {"confusion_weights": {"mel<->nevus": 2.0}}},
     "--set mining.confusion_weights: mining.confusion_weights names unknown class(es) ['nevus']"),
    ({"arms": ["real", "random"]}, "arms must include 'real' and 'mined'"),
    ({"mining": {"split": "test"}}, "--set mining.allow_test_mining=true"),
    ({"mining": {"split": "test", "allow_test_mining": True}},
     "leaves rows of that split out of training: the variants of its hard cases keep their source's split, so the "
     "mined and classical arms would add no image; add it (--set classifier.synthetic_splits=[train,val,test])"),
    ({"base": {"path": "/x", "pretrain": {}}}, "exactly one of path"),
    ({"base": {"pretrain": {"split": "test"}}}, "base.pretrain.split is 'test': the loop's base learns the training"),
    ({"generate": {"scheduler": "foo"}}, "generate.scheduler must be one of ['ddim', 'dpmpp', 'euler'], got 'foo'"),
    ({"quality": {"device": "tpu"}}, "device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    ({"data": {"toy": None, "source": None}}, "exactly one of toy / source / manifest"),
    ({"data": {"toy": {"size": 16}}}, "data.toy.size must be an integer >= 32 px"),
    ({"data": {"toy": None, "manifest": "m.csv", "group_near_duplicates": True}},
     "data.group_near_duplicates applies when the run indexes its data: a given data.manifest keeps its split"),
    ({"generate": {"oversample": 2.0, "max_oversample": 1.5}}, "max_oversample must be >= generate.oversample"),
])
def test_bad_config_values_fail_at_load_naming_the_key(overrides, message):
    with pytest.raises(InputError) as err:
        load_loop_config(None, overrides)
    assert message in str(err.value)



def test_a_yaml_value_the_class_refuses_names_the_file_then_the_section(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("base:\n  asset: nope.safetensors\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(config))}: base: base.asset 'nope.safetensors' is not"):
        load_loop_config(config)

def test_toy_size_takes_what_data_toy_takes():
    assert load_loop_config(None, {"data": {"toy": {"size": 48}}}).data.toy.size == 48


def test_set_null_clears_a_section_of_the_yaml():
    """The documented swap of the in-run pretraining for a base made earlier."""
    overrides = parse_set_options(["base.pretrain=null", "base.path=/bases/derm-dev-small"])
    config = load_loop_config(shipped_config("derm-dev-small"), overrides)
    assert config.base.pretrain is None and config.base.path == "/bases/derm-dev-small"


def test_set_options_parse_as_nested_yaml():
    assert parse_set_options(["classifier.epochs=3", "seeds=[0, 1]", "base.pretrain=null"]) == {
        "classifier": {"epochs": 3}, "seeds": [0, 1], "base": {"pretrain": None}}
    with pytest.raises(InputError, match="KEY=VALUE"):
        parse_set_options(["epochs"])


def test_plan_orders_rounds_then_test_and_never_mines_test(tmp_path):
    config = load_loop_config(None, {"rounds": 2, "seeds": [0, 1], "rare_classes": {"df": 2}})
    names = [stage.name for stage in build_plan(config, RunLayout(tmp_path))]
    assert len(names) == len(set(names)) and names[:3] == ["data", "base", "finetune"]
    first_test = min(i for i, n in enumerate(names) if n.endswith("eval-test"))
    assert all(not n.endswith(("train", "vary", "mine")) for n in names[first_test:])  # test only at the end
    assert names.index("seed-0/round-2/mined/mine") > names.index("seed-0/round-1/mined/train")
    assert names.index("seed-0/round-1/classical/augment") > names.index("seed-0/round-1/mined/prompted")
    assert names.index("seed-0/round-1/random/generate") > names.index("seed-0/round-1/mined/vary")
    assert "seed-1/round-2/random/compare-test" in names and "seed-0/round-0/real/compare-test" not in names
    assert [k.label for k in models(config, 1)][:2] == ["real r0 s1", "mined r1 s1"]
    assert not any("eval-val" in n for n in names)  # the trainer's own validation evaluation is mined


def test_test_mining_is_allowed_only_behind_the_flag_and_evaluates_per_round(tmp_path):
    config = load_loop_config(None, {"mining": {"split": "test", "allow_test_mining": True},
                                     "classifier": {"synthetic_splits": ["train", "val", "test"]}})
    assert config.leakage and "LEAKAGE" in config.mining.leakage_warning
    names = [stage.name for stage in build_plan(config, RunLayout(tmp_path))]
    assert names.index("seed-0/round-0/real/eval-test") < names.index("seed-0/round-1/mined/mine")


def test_classical_copies_match_mined_counts_and_are_deterministic(toy_manifest, tmp_path):
    from lesiongen.data.manifest import Manifest, load_manifest
    from lesiongen.loop.classical import augment_copy, make_classical_set, matched_sources

    real = load_manifest(toy_manifest)
    val = real.df[real.df["split"] == "val"].head(3)
    first, second = val["image"].iloc[0], val["image"].iloc[1]
    mined = pd.DataFrame({  # two variants of `second`, one of `first`, one class-prompted df image (no source)
        "image": ["v0.png", "v1.png", "v2.png", "p0.png"],
        "label": [val["label"].iloc[0], val["label"].iloc[1], val["label"].iloc[1], "df"],
        "split": ["val", "val", "val", "train"], "group_id": ["a", "b", "b", "g"],
        "source_image": [first, second, second, ""]})
    plan = matched_sources([Manifest(mined, tmp_path, real.classes)], real, seed=0)
    counts = {row["image"]: n for row, n in plan}
    assert counts[first] == 1 and counts[second] == 2
    assert sum(counts.values()) == 4 and any(real.df.set_index("image").loc[i, "label"] == "df" for i in counts)

    out = make_classical_set(plan, real, ClassicalConfig(), seed=7, out_dir=tmp_path / "a")
    again = make_classical_set(plan, real, ClassicalConfig(), seed=7, out_dir=tmp_path / "b")
    assert len(out) == 4 and list(out.df["image"]) == list(again.df["image"])
    assert (out.df["synthetic"] == 1).all() and set(out.df["method"]) == {"classical"}
    first = (tmp_path / "a" / out.df["image"].iloc[0]).read_bytes()
    assert first == (tmp_path / "b" / out.df["image"].iloc[0]).read_bytes()
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    a = augment_copy(image, ClassicalConfig(), torch.Generator().manual_seed(1))
    b = augment_copy(image, ClassicalConfig(), torch.Generator().manual_seed(2))
    assert a.shape == image.shape and a.dtype == torch.uint8 and not torch.equal(a, b)


def test_loop_cli_errors(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["loop"])
    assert missing.exit_code == 2 and "--config" in missing.output
    not_a_run = runner.invoke(app, ["loop", "--resume", str(tmp_path)])
    assert not_a_run.exit_code == 2 and "is not a run folder" in not_a_run.output
    unknown = runner.invoke(app, ["loop", "--config", "no-such-config"])
    assert unknown.exit_code == 2 and "shipped" in unknown.output and "demo" in unknown.output
    bad = runner.invoke(app, ["loop", "--config", "demo", "--out", str(tmp_path / "r"), "--set", "rounds=0"])
    assert bad.exit_code == 2 and "rounds must be an integer >= 1" in bad.output
    assert not (tmp_path / "r").exists()  # validated before anything is written
    # a missing input fails before the run folder exists: the corrected command then just works
    for key, flag in (("base.path", ["--set", "base.asset=null"]), ("data.source", ["--set", "data.toy=null"])):
        result = runner.invoke(app, ["loop", "--config", "demo", "--out", str(tmp_path / "r"), *flag,
                                     "--set", f"{key}={tmp_path / 'nowhere'}"])
        assert result.exit_code == 2, result.output
        assert f"--set {key}: {key} '{tmp_path / 'nowhere'}': no such file or folder" in " ".join(result.output.split())
        assert not (tmp_path / "r").exists()


def test_model_key_paths(tmp_path):
    layout = RunLayout(tmp_path)
    key = ModelKey("mined", 2, 1)
    assert layout.model(key) == tmp_path / "seed-1/round-2/mined/train"
    assert layout.evaluation(key, "val") == tmp_path / "seed-1/round-2/mined/train/eval-val"
    assert layout.evaluation(key, "test") == tmp_path / "seed-1/round-2/mined/eval-test"


def test_classes_the_filters_leave_short_are_drawn_again_by_their_pass_rate_up_to_the_cap():
    from lesiongen.loop.prompted import next_draws

    counts = {"bcc": 10, "df": 4, "mel": 10, "nv": 20}
    draws = {"bcc": 15, "df": 6, "mel": 15, "nv": 30}
    passed = {"bcc": 5, "mel": 12, "nv": 20}  # bcc: 1 in 3 pass; df: none; mel, nv: enough
    planned = next_draws(counts, draws, passed, max_oversample=4.0)
    # bcc needs 5 more at a pass rate of 1/3: 15 more draws with 10 % spare -> 17; df jumps to its cap 16
    assert planned == {"bcc": 15 + 17, "df": 16, "mel": 15, "nv": 30}
    assert next_draws(counts, {**planned, "bcc": 40}, {**passed, "bcc": 9}, max_oversample=4.0)["bcc"] == 40  # capped
    settled = {"bcc": 40, "df": 16, "mel": 15, "nv": 30}
    assert next_draws(counts, settled, {"bcc": 9, "mel": 12, "nv": 20}, max_oversample=4.0) == settled  # nothing left
    assert next_draws(counts, draws, passed, max_oversample=1.5) == draws  # no second draw allowed


@pytest.mark.parametrize("items, earlier", [
    (["classifier=null", "classifier.epochs=3"], "classifier"),
    (["seeds=3", "seeds.x=1"], "seeds"),
    (["classifier.epochs=3", "classifier.epochs.max=1"], "classifier.epochs"),
])
def test_conflicting_set_options_are_an_input_error(items, earlier):
    with pytest.raises(InputError, match=f"an earlier --set gave {earlier} the value"):
        parse_set_options(items)


@pytest.mark.parametrize("overrides, message", [
    ({"seeds": [-1]}, "seeds must be integers in [0, 2**32 - 1], got [-1]"),
    ({"seeds": [2**32]}, "seeds must be integers in [0, 2**32 - 1]"),
    ({"seeds": -1}, "got -1"),  # the value given, not the empty list it turned into
    ({"data": {"toy": {"seed": -1}}}, "data.toy.seed must be an integer in [0, 2**32 - 1]"),
    ({"data": {"fractions": [0.5, 0.5, 0.5]}}, "fractions must sum to 1"),
    ({"data": {"split_seed": -1}}, "seed must be a non-negative integer"),
    ({"evaluate": {"batch_size": 0}}, "--set evaluate.batch_size: evaluate.batch_size must be a positive integer"),
    ({"generate": {"guidance": -1}}, "--set generate.guidance: generate.guidance must be >= 0"),
])
def test_values_that_used_to_fail_stages_later_fail_at_load(overrides, message):
    with pytest.raises(InputError) as err:
        load_loop_config(shipped_config("demo"), overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("flag, message", [
    ("classifier.arch=nosuchnet", "--set classifier.arch: classifier.arch: unknown architecture 'nosuchnet'"),
    ("classifier.pretrained=nowhere.safetensors", "--set classifier.pretrained: classifier.pretrained: "),
])
def test_classifier_arch_and_weights_are_checked_before_the_run_folder_exists(flag, message, tmp_path):
    out = tmp_path / "run"
    result = CliRunner(env={"COLUMNS": "2000"}).invoke(app, ["loop", "--config", "demo", "--out", str(out),
                                                             "--set", flag])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_relative_prompt_file_is_saved_absolute(tmp_path, monkeypatch):
    prompts = tmp_path / "mine.yaml"
    shutil.copy(Path(__file__).parents[1] / "prompts" / "ham10000.yaml", prompts)
    monkeypatch.chdir(tmp_path)
    config = absolute_paths(load_loop_config(shipped_config("demo"), {"data": {"prompts": "mine.yaml"}}), tmp_path)
    assert config.data.prompts == str(prompts.resolve())  # a resume or report from elsewhere finds it
    assert absolute_paths(load_loop_config(shipped_config("demo")), tmp_path).data.prompts == "ham10000"



def test_pretrain_inputs_are_saved_absolute(tmp_path):
    (tmp_path / "judge").mkdir()
    overrides = {"base": {"pretrain": {"eval_classifier": "judge", "cache_dir": "cache",
                                       "vae": {"perceptual_weight": 0.1, "perceptual_classifier": "judge"}}}}
    config = absolute_paths(load_loop_config(None, overrides), tmp_path)
    pretrain = config.base.pretrain
    assert pretrain.eval_classifier == pretrain.vae.perceptual_classifier == str((tmp_path / "judge").resolve())
    assert pretrain.cache_dir == str((tmp_path / "cache").resolve())  # not made yet, absolute all the same

def test_a_finetune_resolution_the_base_cannot_take_is_refused_before_the_run_folder_exists(tiny_pipeline_dir,
                                                                                            tmp_path):
    out = tmp_path / "run"
    result = CliRunner(env={"COLUMNS": "2000"}).invoke(app, [
        "loop", "--config", "demo", "--out", str(out), "--set", "base.asset=null",
        "--set", f"base.path={tiny_pipeline_dir}", "--set", "finetune.resolution=20"])
    assert result.exit_code == 2, result.output
    assert "--set finetune.resolution: finetune.resolution 20: the base" in " ".join(result.output.split())
    assert "try 16 or 24" in result.output and not out.exists()
    # a base pretrained in the run: its preset says, before hours of pretraining
    config = load_loop_config(None, {"base": {"pretrain": {"preset": "small"}}, "finetune": {"resolution": 60}})
    with pytest.raises(InputError, match=r"^config: finetune.resolution 60: a 'small' base needs a positive multiple"):
        check_finetune_resolution(config, "config", {})
