"""A small CNN trained in seconds on real images, to judge the class fidelity of generated ones when no
`train-classifier` model is at hand (tests, CPU benches, the toy demo). With a real classifier, use
`eval_classifier` instead: it also gives the domain feature distance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lesiongen.diffusion.pretrain.data import NUM_DIHEDRAL, dihedral
from lesiongen.utils.atomic import atomic_path


def _probe_net(num_classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 16), block(16, 32), block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, num_classes))


@dataclass
class ProbeClassifier:
    model: nn.Module
    size: int

    def _prepare(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float() / 127.5 - 1
        return F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)

    @torch.no_grad()
    def predict(self, images_uint8: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return torch.cat([self.model(self._prepare(images_uint8[i:i + 256])).argmax(1)
                          for i in range(0, len(images_uint8), 256)])

    def accuracy(self, images_uint8: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predict(images_uint8) == labels).float().mean())

    def class_fidelity(self, images_uint8: torch.Tensor, labels: torch.Tensor) -> dict:
        """Overall share of samples classified as their intended class, and the share per class."""
        correct = self.predict(images_uint8) == labels
        per_class = {int(c): float(correct[labels == c].float().mean()) for c in labels.unique()}
        return {"overall": float(correct.float().mean()), "per_class": per_class}


def train_probe(images_uint8: torch.Tensor, labels: torch.Tensor, num_classes: int, *, size: int = 32,
                steps: int = 300, batch_size: int = 64, seed: int = 0,
                weights: str | os.PathLike | None = None) -> ProbeClassifier:
    """Adam on dihedral-augmented images; deterministic by seed. `weights`: a file that caches the result."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = ProbeClassifier(_probe_net(num_classes), size)
    if weights is not None and Path(weights).is_file():
        probe.model.load_state_dict(load_file(str(weights)))
        return probe
    optimizer = torch.optim.Adam(probe.model.parameters(), lr=3e-3)
    probe.model.train()
    for step in range(steps):
        index = torch.randint(len(labels), (batch_size,), generator=generator)
        views = torch.randint(NUM_DIHEDRAL, (batch_size,), generator=generator)
        x = probe._prepare(dihedral(images_uint8[index], views))
        loss = F.cross_entropy(probe.model(x), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:  # linear decay: a stable probe from a short run
            group["lr"] = 3e-3 * (1 - (step + 1) / steps)
    if weights is not None:
        with atomic_path(weights) as tmp:
            save_file(probe.model.state_dict(), str(tmp))
    return probe
