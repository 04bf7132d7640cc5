"""Unit tests of the fine-tuning library: tokens, captions, prompt encoding, data, config."""

from __future__ import annotations

import random

import pytest
import torch

from lesiongen.data.prompts import load_prompts
from lesiongen.errors import InputError


@pytest.fixture()
def tiny_pipe(tiny_pipeline_dir):
    from lesiongen.diffusion.loading import load_pipeline

    pipe = load_pipeline(tiny_pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def prompts():
    return load_prompts("ham10000")


def test_learned_tokens_start_from_their_init_words_with_diffusers_multi_vector_names(tiny_pipe, prompts):
    from lesiongen.diffusion.tokens import add_learned_tokens

    weight_before = tiny_pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    tokens = add_learned_tokens(tiny_pipe.tokenizer, tiny_pipe.text_encoder, prompts, num_vectors=2)
    vocab = tiny_pipe.tokenizer.get_vocab()
    assert tokens.first_new_id == weight_before.shape[0]
    assert tokens.token_ids["<derm-df>"] == [vocab["<derm-df>"], vocab["<derm-df>_1"]]
    # The pipeline's own multi-vector expansion finds both vectors.
    assert tiny_pipe.maybe_convert_prompt("a <derm-df> lesion", tiny_pipe.tokenizer) == "a <derm-df> <derm-df>_1 lesion"
    word_ids = tiny_pipe.tokenizer("melanoma", add_special_tokens=False).input_ids
    expected = weight_before[word_ids].mean(0) if len(word_ids) < 2 else weight_before[word_ids[0]]
    vectors = tokens.embeddings(tiny_pipe.text_encoder)["<derm-mel>"]
    assert vectors.shape == (2, weight_before.shape[1])
    torch.testing.assert_close(vectors[0], expected.float())


def test_a_token_already_in_the_tokenizer_is_refused(tiny_pipe, prompts):
    from lesiongen.diffusion.tokens import add_learned_tokens

    tiny_pipe.tokenizer.add_tokens(["<derm-mel>"])
    with pytest.raises(InputError, match="'<derm-mel>' already exists in the tokenizer"):
        add_learned_tokens(tiny_pipe.tokenizer, tiny_pipe.text_encoder, prompts)


def test_frozen_rows_guard_lets_only_new_rows_move_even_with_weight_decay():
    from lesiongen.diffusion.tokens import FrozenRowsGuard

    torch.manual_seed(0)
    embedding = torch.nn.Embedding(10, 4)
    before = embedding.weight.detach().clone()
    guard = FrozenRowsGuard(embedding, first_new_id=8)
    optimizer = torch.optim.AdamW(embedding.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        embedding(torch.tensor([1, 2, 8, 9])).pow(2).sum().backward()
        assert embedding.weight.grad[:8].abs().sum() == 0  # masked: optimizer statistics stay zero
        optimizer.step()
        optimizer.zero_grad()
        guard.restore()
    assert torch.equal(embedding.weight[:8], before[:8])
    assert not torch.equal(embedding.weight[8:], before[8:])


@pytest.mark.gpu
def test_frozen_rows_guard_follows_the_embedding_to_the_gpu():
    """The guard is made before the pipeline moves to the GPU; its copy of the frozen rows must follow once
    instead of crossing from pageable host memory every step (150 MB for SD 1.5)."""
    from lesiongen.diffusion.tokens import FrozenRowsGuard

    embedding = torch.nn.Embedding(10, 4)
    before = embedding.weight.detach().clone()
    guard = FrozenRowsGuard(embedding, first_new_id=8)
    embedding.to("cuda")  # Module.to keeps the Parameter (and so the guard's hook), with new data
    assert guard.weight is embedding.weight
    with torch.no_grad():
        embedding.weight.add_(1.0)
    guard.restore()
    assert guard.original.device == embedding.weight.device
    assert torch.equal(embedding.weight[:8].cpu(), before[:8])


def test_training_text_states_equal_the_pipelines_prompt_encoding(tiny_pipe, prompts):
    from lesiongen.diffusion.text import CachedPromptEncoder, encode, tokenize
    from lesiongen.diffusion.tokens import add_learned_tokens

    add_learned_tokens(tiny_pipe.tokenizer, tiny_pipe.text_encoder, prompts, num_vectors=3)
    captions = ["a dermoscopy image of <derm-vasc> vascular lesion", ""]
    with torch.no_grad():
        ours = encode(tiny_pipe.text_encoder, tokenize(tiny_pipe, captions))
        theirs, _ = tiny_pipe.encode_prompt(captions, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs)
    cache = CachedPromptEncoder(tiny_pipe)
    torch.testing.assert_close(cache(captions + captions[:1]), torch.cat([ours, ours[:1]]))
    assert len(cache) == 2


def test_captions_use_metadata_templates_and_drop_out_for_guidance(prompts):
    from lesiongen.diffusion.captions import CaptionSampler

    rows = [{"localization": "back", "age": "45.0", "sex": "female"}, {}]
    sampler = CaptionSampler(prompts, ["df", "vasc"], rows, dropout=0.25)
    rng = random.Random(0)
    first = [sampler(0, rng) for _ in range(400)]
    assert 0.15 < first.count("") / 400 < 0.35
    assert any("on the back" in c for c in first) and any("aged 45" in c for c in first)
    assert all("<derm-df>" in c for c in first if c)
    assert all("{" not in c for c in (sampler(1, rng) for _ in range(50)))  # no metadata: templates skipped
    with pytest.raises(InputError, match="class 'xyz' is not in the prompt file"):
        CaptionSampler(prompts, ["xyz"], [{}])


def test_class_balanced_weights_draw_rare_classes_as_often_as_common_ones(tmp_path):
    from lesiongen.diffusion.finetune.data import StepRandomness, TrainingSet, draw_batch

    labels = ["nv"] * 90 + ["df"] * 10
    data = TrainingSet([tmp_path / f"{i}.png" for i in range(100)], labels, [{}] * 100, "test")
    rng = StepRandomness.at(0, 0, 0, 0, "cpu")
    indices, variants = draw_batch(data.sample_weights(1.0), 4000, 4, rng)
    share_df = sum(labels[i] == "df" for i in indices.tolist()) / 4000
    assert 0.45 < share_df < 0.55
    assert set(variants.tolist()) == {0, 1, 2, 3}
    natural, _ = draw_batch(data.sample_weights(0.0), 4000, 1, rng)
    assert sum(labels[i] == "df" for i in natural.tolist()) / 4000 < 0.15


def test_step_randomness_depends_only_on_seed_step_micro_and_process():
    from lesiongen.diffusion.finetune.data import StepRandomness

    a, b = StepRandomness.at(0, 7, 1, 0, "cpu"), StepRandomness.at(0, 7, 1, 0, "cpu")
    assert torch.equal(torch.randn(3, generator=a.cpu), torch.randn(3, generator=b.cpu))
    assert a.python.random() == b.python.random()
    c = StepRandomness.at(0, 7, 1, 1, "cpu")
    assert not torch.equal(torch.randn(3, generator=StepRandomness.at(0, 7, 1, 0, "cpu").cpu),
                           torch.randn(3, generator=c.cpu))


def test_flip_variants_flip_the_images_they_name():
    from lesiongen.diffusion.finetune.data import apply_flips, flip_variants

    variants = flip_variants(["hflip", "vflip"])
    assert variants[0] == (False, False) and len(variants) == 4
    image = torch.arange(4.0).reshape(1, 1, 2, 2).repeat(4, 1, 1, 1)
    out = apply_flips(image, variants, torch.arange(4))
    for code, (h, v) in enumerate(variants):
        dims = [d for d, on in ((-1, h), (-2, v)) if on]
        assert torch.equal(out[code], image[code].flip(dims) if dims else image[code])
    assert flip_variants([]) == [(False, False)]


def test_min_snr_loss_matches_the_reference_formula(tiny_pipe):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from lesiongen.diffusion.finetune.data import StepRandomness
    from lesiongen.diffusion.finetune.loop import diffusion_loss

    scheduler = DDPMScheduler.from_config(tiny_pipe.scheduler.config)
    latents = torch.randn(3, 4, 16, 16)
    states = torch.randn(3, 77, tiny_pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        loss = diffusion_loss(tiny_pipe.unet, scheduler, latents, states, StepRandomness.at(0, 0, 0, 0, "cpu"),
                              snr_gamma=5.0, noise_offset=0.0)
        rng = StepRandomness.at(0, 0, 0, 0, "cpu")  # the same draws, by hand (diffusers' script formula)
        noise = torch.randn(latents.shape, generator=rng.device)
        t = torch.randint(0, 1000, (3,), generator=rng.device)
        pred = tiny_pipe.unet(scheduler.add_noise(latents, noise, t), t, states).sample
        snr = compute_snr(scheduler, t)
        weights = torch.stack([snr, 5.0 * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr
        expected = ((pred - noise) ** 2).mean(dim=(1, 2, 3)).mul(weights).mean()
    torch.testing.assert_close(loss, expected)


def test_resolution_must_divide_by_vae_and_unet_downsampling(tiny_pipe):
    from lesiongen.diffusion.resolution import check_resolution

    assert check_resolution(tiny_pipe, 64, where="tiny") == 64
    with pytest.raises(InputError, match="--resolution 30: .* multiple of 8.*try 24 or 32"):
        check_resolution(tiny_pipe, 30, where="tiny")


@pytest.mark.parametrize("bad, message", [
    ({"method": "dreambooth"}, "method must be one of"),
    ({"warmup_steps": 10}, "warmup_steps > 0 needs"),
    ({"caption_dropout": 1.0}, "caption_dropout"),
    ({"lora": {"rank": 0}}, "lora.rank must be >= 1"),
    ({"lora": {"ranks": 4}}, "unknown key"),
    ({"augment": ["rot45"]}, "augment must be a subset"),
])
def test_bad_settings_are_named(bad, message):
    from lesiongen.config import from_dict
    from lesiongen.diffusion.finetune import FinetuneConfig

    with pytest.raises(InputError, match=message):
        from_dict(FinetuneConfig, bad, where="settings.yaml")


def test_settings_layer_defaults_then_yaml_then_flags(tmp_path):
    from lesiongen.diffusion.finetune import resolve_config

    yaml = tmp_path / "settings.yaml"
    yaml.write_text("steps: 50\ncheckpoint_limit: null\nlora:\n  rank: 8\n")
    flags = {"base": "b", "manifest": "m.csv", "out": str(tmp_path / "run"), "steps": 7, "seed": None,
             "lora": {"rank": None, "alpha": 2.0}}
    config = resolve_config(flags, config_file=str(yaml))
    assert config.steps == 7 and config.seed == 0 and config.method == "lora+ti"
    assert config.checkpoint_limit is None  # an explicit null in YAML is kept, a flag not given is not
    assert config.lora.rank == 8 and config.lora.alpha == 2.0
    with pytest.raises(InputError, match="--base is required"):
        resolve_config({"manifest": "m.csv", "out": "o"})
