"""Every exported LoRA and embedding loads back through diffusers' own loaders and draws the same images.

The LoRAs have non-zero `lora_B` and alpha != rank, so a dropped LoRA or a wrong alpha changes the
images: the `*_is_sensitive` checks prove the comparisons can fail.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from lesiongen.cli.app import app
from lesiongen.errors import InputError

runner = CliRunner(env={"COLUMNS": "2000"})
PROMPT = "a dermoscopy image of <derm-df> dermatofibroma"
TOLERANCE = 1e-4  # images in [0, 1]; only floating-point summation order may differ


def images(pipe, prompt: str = PROMPT) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    return pipe([prompt] * 2, num_inference_steps=2, guidance_scale=3.0, generator=generators, height=32, width=32,
                output_type="pt").images


@pytest.fixture()
def fresh_pipe(tiny_pipeline_dir):
    from lesiongen.diffusion.loading import load_pipeline

    return lambda: load_pipeline(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def trained_images(finetuned_adapter_dir, tiny_pipeline_dir):
    from lesiongen.diffusion.adapters import load_adapted_pipeline

    return images(load_adapted_pipeline(tiny_pipeline_dir, finetuned_adapter_dir))


def load_all_a1111_embeddings(pipe, folder) -> None:
    for path in sorted(folder.glob("derm-*.safetensors")):
        pipe.load_textual_inversion(str(path), token=f"<{path.stem}>")


def test_trained_lora_is_not_vacuous(finetuned_adapter_dir, fresh_pipe, trained_images):
    lora = load_file(finetuned_adapter_dir / "pytorch_lora_weights.safetensors")
    assert min(v.abs().max().item() for k, v in lora.items() if "lora_B" in k) > 0
    pipe = fresh_pipe()
    embeds = load_file(finetuned_adapter_dir / "learned_embeds.safetensors")
    pipe.load_textual_inversion(list(embeds.values()), token=list(embeds))  # tokens only, no LoRA
    assert (images(pipe) - trained_images).abs().max() > 10 * TOLERANCE


def test_kohya_lora_and_a1111_embeddings_reproduce_the_trained_pipeline(finetuned_adapter_dir, fresh_pipe,
                                                                        trained_images):
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(finetuned_adapter_dir), weight_name="derm-tiny_kohya.safetensors")
    load_all_a1111_embeddings(pipe, finetuned_adapter_dir / "embeddings")
    assert (images(pipe) - trained_images).abs().max() < TOLERANCE


def test_kohya_alpha_is_the_true_alpha_not_the_rank(finetuned_adapter_dir, fresh_pipe, trained_images, tmp_path):
    """What diffusers' convert_state_dict_to_kohya writes (alpha = rank) draws other images: the pitfall."""
    state = load_file(finetuned_adapter_dir / "derm-tiny_kohya.safetensors")
    wrong = {k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in state.items()}
    save_file(wrong, tmp_path / "alpha_is_rank.safetensors")
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(tmp_path), weight_name="alpha_is_rank.safetensors")
    load_all_a1111_embeddings(pipe, finetuned_adapter_dir / "embeddings")
    assert (images(pipe) - trained_images).abs().max() > 10 * TOLERANCE


def test_cli_export_round_trips_kohya_and_a1111_back_to_diffusers(finetuned_adapter_dir, tiny_pipeline_dir,
                                                                   fresh_pipe, trained_images, tmp_path):
    a1111 = tmp_path / "a1111"
    result = runner.invoke(app, ["export", str(finetuned_adapter_dir), "--to", "a1111", "--out", str(a1111)])
    assert result.exit_code == 0, result.output
    assert (a1111 / "derm-tiny_kohya.safetensors").is_file() and (a1111 / "derm-nv.safetensors").is_file()
    refused = runner.invoke(app, ["export", str(a1111 / "derm-tiny_kohya.safetensors"), "--to", "diffusers",
                                  "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "--base" in refused.output
    back = tmp_path / "back"
    result = runner.invoke(app, ["export", str(a1111), "--to", "diffusers", "--out", str(back),
                                 "--base", str(tiny_pipeline_dir)])
    assert result.exit_code == 0, result.output
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(back))  # pytorch_lora_weights.safetensors, alpha from its adapter metadata
    embeds = load_file(back / "learned_embeds.safetensors")
    assert sorted(embeds) == sorted(f"<derm-{c}>" for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"))
    pipe.load_textual_inversion(list(embeds.values()), token=list(embeds))
    assert (images(pipe) - trained_images).abs().max() < TOLERANCE


def test_pickled_a1111_embedding_round_trips_only_with_allow_pickle(finetuned_adapter_dir, fresh_pipe, tmp_path):
    from lesiongen.diffusion.embedding_files import load_embeddings

    out = tmp_path / "pt"
    result = runner.invoke(app, ["export", str(finetuned_adapter_dir), "--to", "a1111", "--out", str(out),
                                 "--embedding-format", "pt"])
    assert result.exit_code == 0, result.output
    data = torch.load(out / "derm-df.pt", weights_only=True)
    assert data["name"] == "derm-df" and data["string_to_param"]["*"].shape == (2, 32)
    with pytest.raises(InputError, match="--allow-pickle"):
        load_embeddings(out / "derm-df.pt")
    ours = load_embeddings(out / "derm-df.pt", allow_pickle=True)
    expected = load_file(finetuned_adapter_dir / "learned_embeds.safetensors")["<derm-df>"]
    assert torch.equal(ours["<derm-df>"], expected)
    pipe = fresh_pipe()
    pipe.load_textual_inversion(str(out / "derm-df.pt"), token="<derm-df>")  # diffusers reads A1111's .pt too
    vocab = pipe.tokenizer.get_vocab()
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[[vocab["<derm-df>"], vocab["<derm-df>_1"]]], expected)


def test_lora_with_alpha_not_equal_rank_round_trips_through_every_format(fresh_pipe, tmp_path):
    """A LoRA made directly: random non-zero A and B, alpha 16 on rank 4 on the UNet, alpha 1 on rank 2 on the
    text encoder."""
    from peft import LoraConfig

    from lesiongen.diffusion.lora_files import LoraWeights, save_diffusers_lora, save_kohya_lora

    pipe = fresh_pipe()
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # all four projections, as kohya trains them: diffusers recognises a kohya text-encoder LoRA by its out_proj
    pipe.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=1,
                                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.3)
    prompt = "a dermoscopy image"
    expected = images(pipe, prompt)
    lora = LoraWeights.from_models(unet=pipe.unet, text_encoder=pipe.text_encoder)
    save_diffusers_lora(tmp_path / "pytorch_lora_weights.safetensors", lora)
    save_kohya_lora(tmp_path / "kohya.safetensors", lora)
    for weight_name in ("pytorch_lora_weights.safetensors", "kohya.safetensors"):
        fresh = fresh_pipe()
        fresh.load_lora_weights(str(tmp_path), weight_name=weight_name)
        assert (images(fresh, prompt) - expected).abs().max() < TOLERANCE, weight_name
    assert (images(fresh_pipe(), prompt) - expected).abs().max() > 10 * TOLERANCE  # the LoRA matters


def test_export_rejects_files_that_are_neither_lora_nor_embedding(tmp_path):
    save_file({"conv.weight": torch.zeros(2, 2, 3, 3)}, tmp_path / "model.safetensors")
    result = runner.invoke(app, ["export", str(tmp_path / "model.safetensors"), "--to", "kohya"])
    assert result.exit_code == 2 and "neither a LoRA" in result.output
    result = runner.invoke(app, ["export", str(tmp_path), "--to", "webui"])
    assert result.exit_code == 2 and "webui" in result.output


def test_export_of_embeddings_alone_to_kohya_says_where_they_go(finetuned_adapter_dir, tmp_path):
    out = tmp_path / "kohya"
    result = runner.invoke(app, ["export", str(finetuned_adapter_dir / "embeddings"), "--to", "kohya",
                                 "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "holds no LoRA to convert to kohya (found 7 embedding file(s)" in " ".join(result.output.split())
    assert not out.exists()


def test_export_names_a_file_that_is_not_safetensors(tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\xff" * 64)  # an 8-byte header length far beyond the file
    result = runner.invoke(app, ["export", str(fake), "--to", "kohya"])
    assert result.exit_code == 2, result.output
    assert "fake.safetensors: not a readable safetensors file" in " ".join(result.output.replace("│", " ").split())


def test_export_overwrite_replaces_an_export_and_refuses_anything_else(finetuned_adapter_dir, tmp_path):
    out = tmp_path / "export"
    first = runner.invoke(app, ["export", str(finetuned_adapter_dir), "--to", "diffusers", "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert (out / "learned_embeds.safetensors").is_file()
    again = runner.invoke(app, ["export", str(finetuned_adapter_dir), "--to", "kohya", "--out", str(out)])
    assert again.exit_code == 2 and "export folder" in again.output and "--overwrite" in again.output
    result = runner.invoke(app, ["export", str(finetuned_adapter_dir), "--to", "kohya", "--out", str(out),
                                 "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [".lesiongen.json", "derm-tiny_kohya.safetensors"]  # no stale files
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    (tmp_path / "victim.csv").write_text("a,b\n")
    for target, says in ((notes, "is not an adapter export output folder"), (tmp_path / "victim.csv", "is a file")):
        refused = runner.invoke(app, ["export", str(finetuned_adapter_dir), "--to", "kohya", "--out", str(target),
                                      "--overwrite"])
        assert refused.exit_code == 2 and says in refused.output, refused.output
    assert (notes / "notes.txt").read_text() == "mine" and (tmp_path / "victim.csv").read_text() == "a,b\n"
