"""The adapter folder's README.md: what was trained on what, how to load it in each tool, its limits."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lesiongen.diffusion.adapters import AdapterInfo


def render_model_card(info: AdapterInfo, *, losses: list[dict] | None = None, class_counts: dict | None = None,
                      validation_grid: str | None = None) -> str:
    files = info.files
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [stable-diffusion, lora, textual-inversion, dermoscopy, lesiongen]",
        "---",
        f"# {info.name}: dermoscopy adapter ({info.method})",
        "",
        f"Fine-tuned by lesiongen {info.lesiongen_version} from `{info.base}` "
        f"(sha256 `{info.base_hash[:16]}…`) at {info.resolution} px for {info.steps} steps.",
        "",
        "## Classes and trigger tokens",
        "",
        "| class | token | A1111 / ComfyUI trigger | training images |",
        "| --- | --- | --- | --- |",
    ]
    for cls, token in info.classes.items():
        count = (class_counts or {}).get(cls, "")
        lines.append(f"| {cls} | `{token}` | `{token.strip('<>')}` | {count} |")
    lines += ["", f"Each token has {info.num_vectors} embedding vector(s); prompts come from `{info.prompt_file}`.", ""]
    if info.lora:
        rank, alpha = info.lora["rank"], info.lora["alpha"]
        lines += ["## LoRA", "", f"rank {rank}, alpha {alpha:g} (scale {alpha / rank:g}), on "
                  f"{', '.join(info.lora.get('target_modules', []))}"
                  + (" and the text encoder" if info.lora.get("text_encoder") else "") + ".", ""]
    if losses:
        first, last = losses[0], losses[-1]
        lines += ["## Training", "", f"Loss {first['loss']:.4f} (step {first['step']}) → {last['loss']:.4f} "
                  f"(step {last['step']}); settings in `config.yaml`, per-interval losses in `train_log.json`.", ""]
    if validation_grid:
        lines += [f"![validation images, one row per class]({validation_grid})", ""]
    lines += ["## Use", "", "diffusers:", "", "```python",
              "from lesiongen.diffusion.adapters import load_adapted_pipeline",
              f'pipe = load_adapted_pipeline("{info.base}", "path/to/this/folder")']
    if "lora" in files:
        lines += ["# or by hand:", 'pipe.load_lora_weights("path/to/this/folder")  # pytorch_lora_weights.safetensors']
    if "embeddings" in files:
        lines += ["from safetensors.torch import load_file",
                  'embeds = load_file("path/to/this/folder/learned_embeds.safetensors")',
                  "pipe.load_textual_inversion(list(embeds.values()), token=list(embeds))"]
    first_token = next(iter(info.classes.values()))
    lines += [f'image = pipe("a dermoscopy image of {first_token}").images[0]', "```", ""]
    if "lora" in files or "embeddings" in files:
        lines += ["AUTOMATIC1111 / ComfyUI: copy "
                  + (f"`{files['lora'][1]}` into `models/Lora` " if "lora" in files else "")
                  + ("and " if "lora" in files and "embeddings" in files else "")
                  + ("the files in `embeddings/` into `embeddings/` " if "embeddings" in files else "")
                  + f"and write the trigger word, e.g. `{first_token.strip('<>')}`.", ""]
    if "pipeline" in files:
        lines += ["The `pipeline/` folder is the whole fine-tuned model (tokens included): load it as a base.", ""]
    lines += ["## Limitations", "",
              "Research use only. Generated dermoscopy images are synthetic training data, not medical images; "
              "they inherit the biases of the training set (skin types, sites, devices) and must never be used "
              "for diagnosis.", ""]
    return "\n".join(lines)
