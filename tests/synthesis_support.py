"""Two real toy images (mel, nv) ready for the inversion and variant tests."""

from __future__ import annotations

PROMPTS = ("a dermoscopy image of <derm-mel> melanoma", "a dermoscopy image of <derm-nv> melanocytic nevus")


def toy_batch(pipe, toy_manifest):
    """(uint8 images at the pipeline's size, their latents, class-prompt states, empty-prompt states)."""
    from lesiongen.data.images import load_uint8
    from lesiongen.data.manifest import load_manifest
    from lesiongen.synthesis.conditioning import PromptCache
    from lesiongen.synthesis.latents import encode, pipeline_resolution, to_model_pixels

    manifest = load_manifest(toy_manifest)
    rows = [manifest.df[manifest.df["label"] == label].index[0] for label in ("mel", "nv")]
    size = pipeline_resolution(pipe)
    images = load_uint8([manifest.image_paths()[i] for i in rows], size)
    latents = encode(pipe.vae, to_model_pixels(images, size, device="cpu"))
    cache = PromptCache(pipe, "cpu")
    return images, latents, cache(list(PROMPTS)), cache(["", ""])
