"""Deep-feature caching for the UNet between neighbouring steps (DeepCache, Ma et al., CVPR 2024).

Neighbouring denoising steps change the UNet's low-resolution, high-level features very little. Every
`interval`-th call runs the whole UNet and keeps the input of its last up block; the calls between run
only the full-resolution ends (`conv_in`, the first down block's layers without its downsampler, the
last up block, `conv_out`) and take the deep part from the kept tensor. At SD-1.5 shapes those ends are
29 % of the FLOPs, so an interval of 2 saves about 35 % of them and 3 about 47 %, at some cost in
fidelity that the round-trip PSNR of every inverted image makes visible (bench/RESULTS.md).

`FeatureCachedUNet` stands in for the UNet wherever the synthesis code calls it, but caches only inside
`cached_steps(unet)`, which the DDIM loops (inversion, sampling) enter: each loop starts from a full pass,
so no loop reuses another loop's (or batch's) features, and everything else that calls the UNet (null-text
and embedding fitting, which draw timesteps at random) gets the exact model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

UNSUPPORTED = {  # UNet options whose extra inputs this forward pass does not carry
    "class_embed_type": None, "addition_embed_type": None, "center_input_sample": False,
    "encoder_hid_dim_type": None, "time_cond_proj_dim": None,
}


class FeatureCachedUNet(torch.nn.Module):
    """A UNet2DConditionModel that recomputes its deep features only every `interval` calls."""

    def __init__(self, unet: torch.nn.Module, interval: int, *, compile: bool = False) -> None:
        super().__init__()
        if interval < 2:
            raise ValueError(f"feature cache interval must be >= 2 (1 means no cache), got {interval}")
        unet = getattr(unet, "_orig_mod", unet)  # a torch.compile'd UNet: cache around the module itself
        unsupported = {k: unet.config.get(k) for k, v in UNSUPPORTED.items() if unet.config.get(k, v) != v}
        if unsupported:
            raise ValueError(f"the feature cache supports plain text-conditioned UNets; this one sets {unsupported}")
        if len(unet.down_blocks) < 2 or unet.down_blocks[0].downsamplers is None:
            raise ValueError("the feature cache needs a UNet with at least two resolution levels")
        self.unet, self.interval = unet, interval
        # the two passes are compiled apart: which one runs is decided here, in Python, not in the graph
        self._full = torch.compile(self._full_pass) if compile else self._full_pass
        self._shallow = torch.compile(self._shallow_pass) if compile else self._shallow_pass
        self.reset()

    # what the loops read from a UNet
    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def reset(self) -> None:
        self._deep: torch.Tensor | None = None
        self._calls = 0
        self.active = False  # caching happens only inside `cached_steps`

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = False,
                **unused):
        if unused:
            raise TypeError(f"FeatureCachedUNet takes no {sorted(unused)}")
        if not self.active:
            out = self._full(sample, timestep, encoder_hidden_states)[0]
        elif self._deep is not None and self._calls % self.interval and self._deep.shape[0] == sample.shape[0]:
            out = self._shallow(sample, timestep, encoder_hidden_states, self._deep)
        else:
            out, self._deep = self._full(sample, timestep, encoder_hidden_states)
        self._calls += self.active
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        return (out,)

    # ------------------------------------------------------------------------------------------ passes
    def _embed(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb

    def _first_level(self, sample: torch.Tensor, emb: torch.Tensor, states: torch.Tensor):
        """conv_in and the first down block's layers (its downsampler left out): the last up block's skips."""
        block = self.unet.down_blocks[0]
        hidden = self.unet.conv_in(sample)
        skips = [hidden]
        attentions = getattr(block, "attentions", None)
        for i, resnet in enumerate(block.resnets):
            hidden = resnet(hidden, emb)
            if attentions is not None:
                hidden = attentions[i](hidden, encoder_hidden_states=states, return_dict=False)[0]
            skips.append(hidden)
        return hidden, skips

    def _last_level(self, deep: torch.Tensor, emb: torch.Tensor, states: torch.Tensor,
                    skips: list[torch.Tensor]) -> torch.Tensor:
        unet, block = self.unet, self.unet.up_blocks[-1]
        hidden = block(hidden_states=deep, temb=emb, res_hidden_states_tuple=tuple(skips[-len(block.resnets):]),
                       **_text(block, states))
        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)

    def _full_pass(self, sample: torch.Tensor, timestep, states: torch.Tensor):
        """The UNet's own forward pass, keeping the last up block's input."""
        unet = self.unet
        emb = self._embed(sample, timestep)
        hidden, skips = self._first_level(sample, emb, states)
        first = unet.down_blocks[0]
        for downsampler in first.downsamplers:
            hidden = downsampler(hidden)
        skips.append(hidden)
        for block in unet.down_blocks[1:]:
            hidden, res = block(hidden_states=hidden, temb=emb, **_text(block, states))
            skips.extend(res)
        if unet.mid_block is not None:
            hidden = unet.mid_block(hidden, emb, **_text(unet.mid_block, states))
        for block in unet.up_blocks[:-1]:
            res, skips = skips[-len(block.resnets):], skips[:-len(block.resnets)]
            # the size each upsampler must reach: the next level's skip (odd latent sizes round down)
            hidden = block(hidden_states=hidden, temb=emb, res_hidden_states_tuple=tuple(res),
                           upsample_size=skips[-1].shape[2:], **_text(block, states))
        return self._last_level(hidden, emb, states, skips), hidden

    def _shallow_pass(self, sample: torch.Tensor, timestep, states: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
        emb = self._embed(sample, timestep)
        _, skips = self._first_level(sample, emb, states)
        return self._last_level(deep, emb, states, skips)


def _text(block: torch.nn.Module, states: torch.Tensor) -> dict:
    """The text states, for the blocks that attend to them (diffusers' blocks without attention refuse them)."""
    return {"encoder_hidden_states": states} if getattr(block, "has_cross_attention", False) else {}


@contextlib.contextmanager
def cached_steps(unet) -> Iterator[None]:
    """The UNet calls inside are consecutive steps of one loop over one batch: a `FeatureCachedUNet` may reuse
    deep features between them (a no-op for an ordinary UNet)."""
    if not isinstance(unet, FeatureCachedUNet):
        yield
        return
    unet.reset()
    unet.active = True
    try:
        yield
    finally:
        unet.reset()
