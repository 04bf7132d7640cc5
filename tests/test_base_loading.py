"""One loader for every base: a saved tiny pipeline reloads and generates; bad inputs are named."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lesiongen.diffusion.loading import load_pipeline, pipeline_hash
from lesiongen.errors import InputError


@pytest.fixture
def pipeline_copy(tiny_pipeline_dir, tmp_path):
    """A writable copy of the tiny pipeline folder, for breaking it."""
    return shutil.copytree(tiny_pipeline_dir, tmp_path / "base")


def _generate(pipe, seed: int) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe("a dermoscopy image of <derm-mel> melanoma", num_inference_steps=2, guidance_scale=3.0,
                generator=generator, output_type="np").images[0]


def test_saved_tiny_base_reloads_and_generates(tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    from lesiongen.diffusion.build import build_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert len(pipe.tokenizer) == 49_408
    image = _generate(pipe, seed=0)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all() and image.std() > 0
    np.testing.assert_allclose(image, _generate(pipe, seed=0))  # deterministic per seed
    assert not np.allclose(image, _generate(pipe, seed=1))
    # The folder holds exactly the weights that were built.
    built = build_pipeline("tiny", seed=0)
    for key, value in built.unet.state_dict().items():
        assert torch.equal(value, pipe.unet.state_dict()[key])


def test_load_with_dtype(tiny_pipeline_dir):
    pipe = load_pipeline(tiny_pipeline_dir, torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16


def test_pipeline_hash_is_stable_and_content_based(pipeline_copy, tiny_pipeline_dir):
    original = pipeline_hash(tiny_pipeline_dir)
    assert len(original) == 64 and pipeline_hash(pipeline_copy) == original
    # Files beside the components (samples, logs, provenance) are not part of the model.
    (pipeline_copy / "samples").mkdir()
    (pipeline_copy / "samples" / "grid.json").write_text("{}")
    (pipeline_copy / "lesiongen_base.json").write_text("{}")
    assert pipeline_hash(pipeline_copy) == original
    config = pipeline_copy / "scheduler" / "scheduler_config.json"
    data = json.loads(config.read_text())
    data["prediction_type"] = "v_prediction"
    config.write_text(json.dumps(data))
    assert pipeline_hash(pipeline_copy) != original


def test_wrong_path_is_named(tmp_path):
    missing = tmp_path / "no-such-base"
    with pytest.raises(InputError, match=f"{missing}: no such file or folder"):
        load_pipeline(missing)


def test_folder_without_model_index_is_named(tiny_pipeline_dir, tmp_path):
    with pytest.raises(InputError, match=r"no model_index\.json"):
        load_pipeline(tmp_path)
    with pytest.raises(InputError, match=r"unet.*no model_index\.json.*single model"):
        load_pipeline(tiny_pipeline_dir / "unet")


def test_missing_component_folder_is_named(pipeline_copy):
    shutil.rmtree(pipeline_copy / "unet")
    with pytest.raises(InputError, match=r"\['unet'\].*subfolder"):
        load_pipeline(pipeline_copy)


def test_missing_component_entry_is_named(pipeline_copy):
    index_file = pipeline_copy / "model_index.json"
    index = json.loads(index_file.read_text())
    del index["text_encoder"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"model_index\.json: no \['text_encoder'\] component"):
        load_pipeline(pipeline_copy)


def test_corrupt_weights_or_config_in_folder_are_named(pipeline_copy):
    from typer.testing import CliRunner

    from lesiongen.cli.app import app

    weights = pipeline_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 9 // 10])  # truncated: the header no longer covers the file
    result = CliRunner(env={"COLUMNS": "2000"}).invoke(app, ["base", "info", str(pipeline_copy)])
    assert result.exit_code == 2, result.output
    assert "diffusion_pytorch_model.safetensors: not a readable safetensors file" in result.output
    weights.write_bytes(data)
    config = pipeline_copy / "vae" / "config.json"
    config.write_text("{not json")
    with pytest.raises(InputError, match=r"vae/config\.json: not valid JSON"):
        load_pipeline(pipeline_copy)


def test_pickle_file_needs_allow_pickle(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(InputError, match=r"model\.ckpt.*pickle.*--allow-pickle"):
        load_pipeline(ckpt)


def test_pickle_weights_in_folder_need_allow_pickle(pipeline_copy):
    from safetensors.torch import load_file

    unet_dir = pipeline_copy / "unet"
    weights = unet_dir / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), unet_dir / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(InputError, match=r"unet: only pickle weights \(diffusion_pytorch_model\.bin\).*--allow-pickle"):
        load_pipeline(pipeline_copy)
    pipe = load_pipeline(pipeline_copy, allow_pickle=True)  # the flag really opens the door
    assert pipe.unet.config.sample_size == 16


def test_not_a_checkpoint_file_is_named(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(InputError, match=r"notes\.txt: not a checkpoint file"):
        load_pipeline(notes)


def test_hub_id_offline_is_explained(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match=r"some-org/some-model.*HF_HUB_OFFLINE"):
        load_pipeline("some-org/some-model")


def test_single_file_of_unknown_shape_offline_asks_for_config(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    odd = tmp_path / "odd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, odd)
    with pytest.raises(InputError, match=r"odd\.safetensors: not an SD 1\.5-shaped checkpoint.*--config"):
        load_pipeline(odd)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match=r"broken\.safetensors: not a readable safetensors file"):
        load_pipeline(broken)


def _assert_same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        for key, value in sa.items():
            assert torch.equal(value, sb[key].reshape(value.shape)), f"{name}.{key}"


def test_single_file_round_trip_sd15_layout(tmp_path, monkeypatch):
    """SD 1.5's block layout (4 levels, 2 layers, 3 cross-attention levels) at toy widths survives
    export to original keys and `from_single_file`, weight for weight, offline."""
    from lesiongen.diffusion.build import build_components, pipeline_from_components
    from lesiongen.diffusion.presets import BasePreset, _sd_unet, get_preset
    from lesiongen.diffusion.single_file import export_single_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    layout = BasePreset(
        name="sd15-layout", resolution=64,
        unet=_sd_unet((8, 16, 16, 16), cross_attn_levels=3, layers_per_block=2, cross_attention_dim=32, heads=2,
                      norm_groups=8),
        vae={"block_out_channels": (8, 8, 16, 16), "layers_per_block": 2, "norm_num_groups": 8},
        text_encoder=dict(get_preset("tiny").text_encoder),
    )
    pipe = pipeline_from_components(build_components(layout, seed=5))
    pipe.vae.register_to_config(scaling_factor=0.5)
    out = export_single_file(pipe, tmp_path / "model.safetensors", half=False)
    loaded = load_pipeline(out)
    _assert_same_weights(pipe, loaded)
    assert loaded.vae.config.scaling_factor == 0.5
    assert loaded.unet.config.sample_size * loaded.vae_scale_factor == 64


def test_base_export_cli_round_trip(tiny_pipeline_dir, tmp_path):
    from typer.testing import CliRunner

    from lesiongen.cli.app import app

    out = tmp_path / "tiny.safetensors"
    result = CliRunner().invoke(app, ["base", "export", str(tiny_pipeline_dir), "--out", str(out), "--fp32"])
    assert result.exit_code == 0, result.output
    _assert_same_weights(load_pipeline(tiny_pipeline_dir), load_pipeline(out))
    result = CliRunner().invoke(app, ["base", "export", str(tiny_pipeline_dir), "--out", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_pickle_single_file_with_flag_and_config(tiny_pipeline_dir, tmp_path, monkeypatch):
    from lesiongen.diffusion.ldm_format import pipeline_to_ldm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(tiny_pipeline_dir)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": pipeline_to_ldm(pipe)}, ckpt)
    with pytest.raises(InputError, match="--allow-pickle"):
        load_pipeline(ckpt, config=tiny_pipeline_dir)
    with pytest.raises(InputError, match=r"tiny\.ckpt: not an SD 1\.5-shaped checkpoint.*--config"):
        load_pipeline(ckpt, allow_pickle=True)
    with pytest.raises(InputError, match=r"--config .*: not a diffusers folder"):
        load_pipeline(ckpt, allow_pickle=True, config=tmp_path)
    _assert_same_weights(pipe, load_pipeline(ckpt, allow_pickle=True, config=tiny_pipeline_dir))


def test_fp16_folder_loads_in_one_dtype(tmp_path):
    from lesiongen.diffusion.build import build_pipeline

    build_pipeline("tiny", seed=0).to(torch.float16).save_pretrained(tmp_path / "half")
    pipe = load_pipeline(tmp_path / "half")
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert _generate(pipe, seed=0).shape == (32, 32, 3)
