"""Hard cases -> synthetic training images: `mine-and-generate`.

mining.py       hard cases from `evaluate`'s predictions (confusion-aware, capped, leakage-guarded)
latents.py      pixels <-> VAE latents at the pipeline's resolution; PSNR / SSIM
conditioning.py per-image text conditioning, batched classifier-free guidance, prompt cache
inversion.py    DDIM inversion and the matching sampling loop, fixed-point and null-text refinement
variants.py     img2img from the inverted trajectory, embedding guidance, classifier guidance
filters.py      off-class, near-copy (memorisation) and failed-reconstruction filters
outputs.py      the output folder, per-source records and the synthetic manifest with provenance
pipeline.py     the whole run: config, models, sharding over accelerate processes, resume
"""
