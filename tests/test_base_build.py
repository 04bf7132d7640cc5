"""Base models built from configs: the real CLIP tokenizer, presets, random-weight pipelines."""

from __future__ import annotations

import json

import pytest
import torch

from lesiongen.diffusion.presets import PRESETS, get_preset
from lesiongen.diffusion.tokenizer import CLIP_VOCAB_SIZE, build_clip_tokenizer, derive_vocab_and_merges
from lesiongen.errors import InputError

PROMPTS = [
    "a dermoscopy image of a melanoma",
    "Dermoscopic photograph of <derm-bcc>, pearly lesion with arborizing vessels!",
    "it's a 7mm   mole... on the BACK; patient aged 45",
    "red-purple lacunae (vascular lesion) #42 @clinic",
]


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    return build_clip_tokenizer(cache_dir=tmp_path_factory.mktemp("clip-tok"))


def test_tokenizer_matches_open_clip(clip_tokenizer):
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    reference = open_clip.get_tokenizer("ViT-L-14")(PROMPTS)  # (N, 77), zero padded
    for prompt, ref_row in zip(PROMPTS, reference):
        ids = clip_tokenizer(prompt).input_ids
        assert ids == [simple.sot_token_id, *simple.encode(prompt), simple.eot_token_id]
        assert ids == ref_row[: len(ids)].tolist()
    assert len(clip_tokenizer) == CLIP_VOCAB_SIZE == 49_408
    assert clip_tokenizer.model_max_length == 77
    assert clip_tokenizer.bos_token_id == 49_406 and clip_tokenizer.eos_token_id == 49_407
    assert clip_tokenizer.pad_token == "<|endoftext|>"  # as SD 1.5 pads
    padded = clip_tokenizer(PROMPTS[0], padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49_407


def test_tokenizer_files_are_the_clip_vocabulary(clip_tokenizer, tmp_path):
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    vocab, merges = derive_vocab_and_merges(default_bpe())
    simple = SimpleTokenizer()
    assert len(merges) == 48_894
    # open_clip names the specials <start_of_text>/<end_of_text>; everything else is identical.
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert vocab == {renamed.get(token, token): i for token, i in simple.encoder.items()}
    assert clip_tokenizer.convert_tokens_to_ids("melanoma</w>") == vocab["melanoma</w>"]


def test_tokenizer_cache_is_reused(tmp_path):
    build_clip_tokenizer(cache_dir=tmp_path)
    written = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(written)
    build_clip_tokenizer(cache_dir=tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == written


def test_sd15_preset_has_sd15_shapes():
    """Instantiated on the meta device: exact SD 1.5 parameter counts without allocating 1 B weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    preset = get_preset("sd15")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset.unet_config())
        vae = AutoencoderKL(**preset.vae_config())
        text = CLIPTextModel(CLIPTextConfig(**preset.text_encoder_config()))
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, text)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]
    assert preset.resolution == 512 and preset.latent_size == 64 and preset.vae_scale_factor == 8


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_record_native_resolution(name):
    preset = get_preset(name)
    assert preset.unet_config()["sample_size"] * preset.vae_scale_factor == preset.resolution
    assert preset.vae_config()["sample_size"] == preset.resolution
    assert preset.scheduler["beta_schedule"] == "scaled_linear" and preset.scheduler["steps_offset"] == 1


def test_unknown_preset_is_named():
    with pytest.raises(InputError, match="'huge'.*tiny"):
        get_preset("huge")


def test_build_pipeline_is_deterministic_and_sd_format():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lesiongen.diffusion.build import build_pipeline
    from lesiongen.diffusion.info import describe_pipeline, native_resolution

    a, b = build_pipeline("tiny", seed=0), build_pipeline("tiny", seed=0)
    c = build_pipeline("tiny", seed=1)
    assert isinstance(a, StableDiffusionPipeline) and isinstance(a.scheduler, DDIMScheduler)
    assert a.safety_checker is None and a.feature_extractor is None
    assert native_resolution(a) == 32
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    info = describe_pipeline(a)
    assert info["components"]["unet"]["parameters"] < 1_000_000  # tiny really is tiny
    assert info["components"]["tokenizer"]["vocab_size"] == 49_408
    assert json.dumps(info)  # JSON-able
