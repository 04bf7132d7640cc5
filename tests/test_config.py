"""`lesiongen.config.from_dict`: every value checked against its field's type (NaN / inf, wrong types, scalars
where a section belongs), errors naming the key or the flag it came from; every shipped config loads."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from lesiongen.classifier.config import TrainConfig
from lesiongen.cli.app import app
from lesiongen.cli.finetune import FINETUNE_FLAGS
from lesiongen.cli.synthesis import SYNTHESIS_FLAGS
from lesiongen.config import ALLOW_INF, check_finite, from_dict, load_yaml, to_dict, with_defaults
from lesiongen.diffusion.finetune import FinetuneConfig, resolve_config
from lesiongen.diffusion.generate import GenerationSettings
from lesiongen.diffusion.presets import PRESETS
from lesiongen.diffusion.pretrain import PretrainConfig
from lesiongen.diffusion.resolution import check_resolution
from lesiongen.errors import InputError
from lesiongen.loop.config import LoopConfig, load_loop_config
from lesiongen.metrics.quality import QualityConfig
from lesiongen.synthesis.mining import MiningConfig
from lesiongen.synthesis.pipeline import SynthesisConfig

runner = CliRunner()
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SYNTHESIS_INPUTS = {"predictions": "p.csv", "manifest": "m.csv", "base": "b"}
# Each root config class, with the values it cannot be built without.
ROOTS = [(TrainConfig, {}), (FinetuneConfig, {}), (PretrainConfig, {}), (SynthesisConfig, SYNTHESIS_INPUTS),
         (MiningConfig, {}), (QualityConfig, {}), (LoopConfig, {})]


def _float_fields(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], int | None]]:
    """(path, None) of every field that takes a float, (path, n) of those that take n floats as a list, nested
    sections included."""
    paths = []
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint) or (hint,)
        if float in args and typing.get_origin(hint) is not tuple:
            paths.append(((*prefix, name), None))
        elif typing.get_origin(hint) is tuple and float in args:
            paths.append(((*prefix, name), len(args)))
        paths += [p for a in args if dataclasses.is_dataclass(a) for p in _float_fields(a, (*prefix, name))]
    return paths


def _nested(path: tuple[str, ...], value: Any) -> dict:
    for key in reversed(path):
        value = {key: value}
    return value


def _with(base: dict, path: tuple[str, ...], value: Any) -> dict:
    out = dict(base)
    out.update(_nested(path, value))
    return out


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, ".nan"])
@pytest.mark.parametrize("cls, required", ROOTS, ids=lambda v: getattr(v, "__name__", ""))
def test_every_float_setting_refuses_non_finite_values(cls, required, bad):
    bad = math.nan if bad == ".nan" else bad
    paths = _float_fields(cls)
    assert paths  # the walk found the float fields
    for path, items in paths:
        value, key = (bad, ".".join(path)) if items is None else ([bad] * items, ".".join(path) + "[0]")
        with pytest.raises(InputError) as err:
            from_dict(cls, _with(required, path, value), where="run.yaml")
        assert f"run.yaml: {key}: expected a finite number, got {bad!r}" in str(err.value)


def test_nan_flags_of_the_audit_name_the_flag(tmp_path):
    flags = {"inversion": {"guidance": math.nan}}
    with pytest.raises(InputError, match=r"^--inversion-guidance: expected a finite number, got nan$"):
        from_dict(SynthesisConfig, {**SYNTHESIS_INPUTS, **flags}, flags=flags, flag_names=SYNTHESIS_FLAGS)
    flags = {"filters": {"min_inversion_psnr": math.nan}}
    with pytest.raises(InputError, match=r"^--min-inversion-psnr: expected a finite number"):
        from_dict(SynthesisConfig, {**SYNTHESIS_INPUTS, **flags}, flags=flags, flag_names=SYNTHESIS_FLAGS)
    out = str(tmp_path / "ad")
    flags = {"base": "b", "manifest": "m.csv", "out": out, "tokens": {"lr": math.nan}}
    with pytest.raises(InputError, match=r"^--token-lr: expected a finite number, got nan$"):
        resolve_config(flags, flag_names=FINETUNE_FLAGS)
    # a config saved with NaN (by an older version) is refused on --resume, naming the file and the key
    Path(out).mkdir()
    (Path(out) / "config.yaml").write_text("base: b\nmanifest: m.csv\ntokens: {lr: .nan}\n")
    with pytest.raises(InputError, match=r"tokens\.lr: expected a finite number, got nan"):
        resolve_config({"out": out}, resume="latest")


def test_nan_flags_fail_on_the_command_line_before_any_work(tmp_path):
    result = runner.invoke(app, ["mine-and-generate", "--predictions", "p.csv", "--manifest", "m.csv", "--base", "b",
                                 "--min-inversion-psnr", "nan", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--min-inversion-psnr: expected a finite number, got nan" in result.output
    result = runner.invoke(app, ["finetune", "--base", "b", "--manifest", "m.csv", "--out", str(tmp_path / "f"),
                                 "--token-lr", "nan"])
    assert result.exit_code == 2 and "--token-lr: expected a finite number, got nan" in result.output
    assert not (tmp_path / "f").exists()


def test_generation_settings_refuse_nan_guidance():
    with pytest.raises(ValueError, match="guidance must be a finite number, got nan"):
        GenerationSettings(guidance=math.nan)


@pytest.mark.parametrize("cls, data, message", [
    (SynthesisConfig, {**SYNTHESIS_INPUTS, "inversion": 5},
     "inversion: expected a section (a mapping of keys such as steps, depth, guidance, fixed_point_iterations, ...), "
     "got 5"),
    (PretrainConfig, {"vae": 3}, "vae: expected a section"),
    (FinetuneConfig, {"lora": 5}, "lora: expected a section (a mapping of keys such as rank, alpha"),
    (FinetuneConfig, {"steps": "many"}, "steps: expected an integer, got 'many'"),
    (SynthesisConfig, {**SYNTHESIS_INPUTS, "variants": {"strength": "high"}},
     "variants.strength: expected a number, got 'high'"),
    (PretrainConfig, {"unet": {"learning_rate": "fast"}}, "unet.learning_rate: expected a number, got 'fast'"),
    (TrainConfig, {"epochs": True}, "epochs: expected an integer, got True"),
    (TrainConfig, {"channels_last": 1}, "channels_last: expected true or false, got 1"),
    (TrainConfig, {"augment": {"scale": [0.5]}}, "augment.scale: expected a list of 2 numbers, got [0.5]"),
    (TrainConfig, {"synthetic": "a.csv"}, "synthetic: expected a list of strings, got 'a.csv'"),
    (TrainConfig, {"mixed_precision": False}, "mixed_precision: expected a string (YAML reads unquoted yes"),
    (TrainConfig, {"load_size": 64.5}, "load_size: expected an integer or null, got 64.5"),
    (FinetuneConfig, {"augment": ["hflip", 3]}, "augment[1]: expected a string, got 3"),
    (MiningConfig, {"per_class_quota": {"mel": "many"}}, "per_class_quota.mel: expected an integer, got 'many'"),
    (MiningConfig, {"per_class_quota": "many"}, "per_class_quota: expected an integer, a mapping of strings to "
                                                "integers or null, got 'many'"),
    (SynthesisConfig, {**SYNTHESIS_INPUTS, "inversion": {"depth": "half"}},
     "inversion.depth: expected one of ['strength', 'full'], got 'half'"),
    (LoopConfig, {"rare_classes": {"df": True}}, "rare_classes.df: expected an integer, got True"),
    (LoopConfig, {"seeds": [0, "a"]}, "seeds[1]: expected an integer, got 'a'"),
    (LoopConfig, {"synthesis": 3}, "synthesis: expected a mapping, got 3"),
    (LoopConfig, {"base": {"pretrain": {"vae": 3}}}, "base.pretrain.vae: expected a section"),
])
def test_wrong_types_and_shapes_name_the_key(cls, data, message):
    with pytest.raises(InputError) as err:
        from_dict(cls, data, where="run.yaml")
    assert str(err.value).startswith(f"run.yaml: {message}")


def test_values_that_fit_are_accepted_and_converted():
    config = from_dict(TrainConfig, {"lr": 1, "augment": {"scale": [0.5, 1]}, "color_constancy": None,
                                     "grad_clip": "1e-1"})  # PyYAML reads 1e-1 (no dot) as a string
    assert config.lr == 1 and config.augment.scale == (0.5, 1.0) and config.grad_clip == 0.1
    loop = from_dict(LoopConfig, {"seeds": 2, "data": {"toy": {}, "fractions": [0.8, 0.1, 0.1]}})
    assert loop.seeds == [0, 1] and loop.data.fractions == (0.8, 0.1, 0.1)
    assert from_dict(MiningConfig, {"per_class_quota": {"mel": 3}}).per_class_quota == {"mel": 3}
    synthesis = from_dict(LoopConfig, {"synthesis": {"variants": {"per_image": 2}}}).synthesis
    assert synthesis["variants"]["per_image"] == 2  # dict[str, Any] sections are checked by their own class


def test_any_fields_stay_free_and_inf_is_an_opt_in():
    @dataclass
    class Settings:
        anything: Any = None
        extras: dict[str, Any] = field(default_factory=dict)
        clip: float = field(default=1.0, metadata=ALLOW_INF)
        rate: float = 0.1

    built = from_dict(Settings, {"anything": [1, "x"], "extras": {"a": {"b": None}}, "clip": math.inf})
    assert built.anything == [1, "x"] and built.extras == {"a": {"b": None}} and built.clip == math.inf
    with pytest.raises(InputError, match="clip: expected a finite number, got nan"):
        from_dict(Settings, {"clip": math.nan})
    with pytest.raises(InputError, match="rate: expected a finite number, got inf"):
        from_dict(Settings, {"rate": math.inf})
    with pytest.raises(InputError, match="extras: expected a mapping, got 'x'"):
        from_dict(Settings, {"extras": "x"})
    check_finite(Settings(clip=math.inf))
    with pytest.raises(ValueError, match="rate must be a finite number"):
        check_finite(Settings(rate=math.nan))


def test_a_bad_value_names_the_flag_it_came_from_not_the_yaml(tmp_path):
    from lesiongen.cli.classifier import resolve_train_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("lr: 0.001\nepochs: 3\n")
    flags = {"lr": -1.0, "seed": 3, "manifest": None}
    with pytest.raises(InputError, match=r"^--lr: lr must be a positive number no larger than 3\.4e\+38 .*, got -1$"):
        resolve_train_config(recipe, flags, tmp_path / "out", None)
    recipe.write_text("lr: -1\n")  # the YAML's own bad value is still the YAML's
    with pytest.raises(InputError, match=rf"^{recipe}: lr must be a positive number .*, got -1$"):
        resolve_train_config(recipe, {"seed": 3}, tmp_path / "out", None)
    with pytest.raises(InputError, match=r"^--warmup-steps: warmup_steps > 0 needs lr_scheduler"):
        resolve_config({"base": "b", "manifest": "m", "out": "o", "warmup_steps": 10})
    with pytest.raises(InputError, match=r"^--set classifier\.lr: lr must be a positive number"):
        load_loop_config(None, {"classifier": {"lr": -1}})
    # finite for Python but not for an fp32 optimizer step: refused before any training
    with pytest.raises(InputError, match=r"^--lr: lr must be a positive number .*, got 1e\+39$"):
        resolve_config({"base": "b", "manifest": "m", "out": "o", "lr": 1e39})
    with pytest.raises(InputError, match=r"^--token-lr: tokens\.lr must be a positive number .*, got 1e\+39$"):
        resolve_config({"base": "b", "manifest": "m", "out": "o", "tokens": {"lr": 1e39}}, flag_names=FINETUNE_FLAGS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_pretraining_takes_only_resolutions_its_base_can_later_generate_at(preset):
    spec = PRESETS[preset]
    pipe = SimpleNamespace(vae_scale_factor=spec.vae_scale_factor,
                           unet=SimpleNamespace(config=SimpleNamespace(down_block_types=spec.unet["down_block_types"])))
    for resolution in range(8, 161):
        try:
            check_resolution(pipe, resolution, where=preset)
            usable = True
        except InputError:
            usable = False
        if usable:
            assert PretrainConfig(preset=preset, resolution=resolution).resolution == resolution
        else:
            with pytest.raises(ValueError, match=rf"resolution {resolution}: a '{preset}' base needs a positive "
                                                 "multiple of"):
                PretrainConfig(preset=preset, resolution=resolution)
    with pytest.raises(InputError, match=r"^--resolution: resolution 36: a 'tiny' base needs a positive multiple "
                                         r"of 8 \(VAE x2, UNet x2, and diffusers' pipelines take multiples of 8\); "
                                         r"try 32 or 40"):
        from_dict(PretrainConfig, {"preset": "tiny", "resolution": 36}, flags={"resolution": 36})


def test_every_size_the_check_accepts_a_tiny_base_renders_at():
    """A tiny base's VAE halves once and its UNet once: 4 px would suit both, but diffusers' pipelines refuse
    sizes not divisible by 8 (a finetune at 20 px trained, then failed at its first validation grid)."""
    from lesiongen.diffusion.build import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    for size in range(4, 41, 4):
        try:
            check_resolution(pipe, size, where="tiny")
        except InputError:
            continue
        image = pipe("a lesion", height=size, width=size, num_inference_steps=1, output_type="pt").images
        assert image.shape[-2:] == (size, size)
    with pytest.raises(InputError, match="multiple of 8"):
        check_resolution(pipe, 20, where="tiny")


def test_non_positive_resolutions_say_so():
    pipe = SimpleNamespace(vae_scale_factor=2, unet=SimpleNamespace(config=SimpleNamespace(down_block_types=[0, 0])))
    for bad in (0, -32):
        with pytest.raises(InputError, match=rf"^--resolution {bad}: must be positive \(the base b takes multiples "
                                             r"of 8 px\)$"):
            check_resolution(pipe, bad, where="b")
    result = runner.invoke(app, ["generate", "--base", "b", "--class", "mel", "--resolution", "0"])
    assert result.exit_code == 2 and "--resolution" in result.output


# Every YAML in configs/ and the class that reads it (a new file must be added here).
SHIPPED = {"demo": LoopConfig, "derm-dev-small": LoopConfig, "ham10000-sd15": LoopConfig,
           "isic2019-sd15": LoopConfig, "derm-dev-classifier": TrainConfig, "pretrain-toy-cpu": PretrainConfig,
           "pretrain-derm-dev-gpu": PretrainConfig}


def test_every_shipped_config_loads_through_its_class():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(SHIPPED)
    for name, cls in SHIPPED.items():
        path = CONFIGS / f"{name}.yaml"
        config = load_loop_config(path) if cls is LoopConfig else from_dict(cls, load_yaml(path), where=str(path))
        assert isinstance(config, cls)


def test_config_path_takes_shipped_names_and_the_readme_spelling_from_anywhere(tmp_path, monkeypatch):
    from lesiongen.config import config_path

    monkeypatch.chdir(tmp_path)
    assert config_path("derm-dev-classifier").read_text() == (CONFIGS / "derm-dev-classifier.yaml").read_text()
    assert config_path("configs/demo.yaml").read_text() == (CONFIGS / "demo.yaml").read_text()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("seeds: 1\n")  # a local file wins over the shipped one
    assert config_path("configs/demo.yaml") == Path("configs/demo.yaml")
    assert config_path("elsewhere/demo.yaml") == Path("elsewhere/demo.yaml")  # load_yaml will say not found
    with pytest.raises(InputError, match=r"config 'demoo' is neither a file nor a shipped config \(shipped: .*demo"):
        config_path("demoo")
    (tmp_path / "demo").mkdir()  # e.g. the demo's run folder: a folder never hides the shipped config
    assert config_path("demo").read_text() == (CONFIGS / "demo.yaml").read_text()


@pytest.mark.parametrize("command, config", [("train-classifier", "derm-dev-classifier"),
                                             ("base pretrain", "configs/pretrain-toy-cpu.yaml")])
def test_commands_read_shipped_configs_by_name(command, config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository, where configs/ does not exist
    result = runner.invoke(app, [*command.split(), "--config", config, "--manifest", "missing.csv", "--out", "o"])
    assert result.exit_code != 0
    assert "missing.csv" in result.output and "config" not in result.output.lower(), result.output
    result = runner.invoke(app, [*command.split(), "--config", "nosuch", "--manifest", "missing.csv", "--out", "o"])
    assert "config 'nosuch' is neither a file nor a shipped config" in result.output


def test_a_refused_mapping_from_a_flag_names_the_flag():
    """`--confusion mel-nv=2` is one flag giving a whole mapping: the error names it, not the config section."""
    from lesiongen.synthesis.mining import MiningConfig
    from lesiongen.synthesis.pipeline import SynthesisConfig

    flags = {"confusion_weights": {"mel-nv": 2.0}}
    with pytest.raises(InputError, match=r"^--confusion: confusion pair 'mel-nv' must look like 'mel<->nv'"):
        from_dict(MiningConfig, flags, where="mine", flags=flags, flag_names={"confusion_weights": "--confusion"})
    nested = {"predictions": "p.csv", "manifest": "m.csv", "base": "b", "out": "o", "mining": flags}
    with pytest.raises(InputError, match=r"^--confusion: confusion pair"):
        from_dict(SynthesisConfig, nested, where="mine-and-generate", flags={"mining": flags},
                  flag_names={"mining.confusion_weights": "--confusion"})


def test_yaml_that_is_not_utf8_or_not_yaml_is_one_line_naming_the_file_and_place(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"epochs: 3\nnote: caf\xe9\n")
    with pytest.raises(InputError, match=r"latin1\.yaml: not UTF-8 text \(byte 19, line 2: invalid"):
        load_yaml(tmp_path / "latin1.yaml")
    (tmp_path / "broken.yaml").write_text("epochs: [1\nlr: 2\n")
    with pytest.raises(InputError) as caught:
        load_yaml(tmp_path / "broken.yaml")
    assert "broken.yaml: not valid YAML (line 2, column 3: expected ',' or ']'" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_out_below_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(app, ["data", "toy", "--out", str(tmp_path / "afile" / "sub")])
    assert result.exit_code == 2, result.output
    assert f"Error: {tmp_path / 'afile'} is a file, but a folder is needed there" in result.output


def test_with_defaults_fills_fields_added_since_a_config_was_saved_at_any_depth():
    from lesiongen.synthesis.pipeline import SynthesisConfig

    today = to_dict(SynthesisConfig(predictions="p.csv", manifest="m.csv", base="b"))
    saved = {**today, "mining": {k: v for k, v in today["mining"].items() if k != "selection_reserve"},
             "leakage_warning": "kept as it is"}
    del saved["feature_cache"]
    filled = with_defaults(SynthesisConfig, saved)
    assert filled == {**today, "leakage_warning": "kept as it is"}
    changed = with_defaults(SynthesisConfig, {**saved, "mining": {"split": "test"}})
    assert changed["mining"] == {**today["mining"], "split": "test"}  # a saved value is kept, not replaced


def test_a_key_given_twice_in_the_config_file_is_an_error(tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text("classifier:\n  epochs: 2\n  arch: test_efficientnet\nrounds: 1\nclassifier:\n  epochs: 1\n")
    with pytest.raises(InputError, match=r"key 'classifier' is given twice \(first on line 1\)"):
        load_loop_config(config)


def test_a_key_after_a_yaml_merge_overrides_the_merged_value(tmp_path):
    path = tmp_path / "anchored.yaml"
    path.write_text("common: &common\n  epochs: 2\n  lr: 0.1\nclassifier:\n  <<: *common\n  epochs: 3\n")
    assert load_yaml(path)["classifier"] == {"epochs": 3, "lr": 0.1}
