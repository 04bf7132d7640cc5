"""Where every stage of a loop run lives inside the run folder (shared by the loop and the report).

    data/                                  manifest.csv (+ meta) of the real images
    base/                                  the diffusion base (pretrained here, or a record of the path)
    finetune/                              the adapter (LoRA + class tokens)
    seed-S/round-0/real/{train,eval-test}
    seed-S/round-R/mined/{mine,vary,prompted,train,eval-test,compare-test,quality}
    seed-S/round-R/classical/{augment,train,eval-test,compare-test}
    seed-S/round-R/random/{generate,train,eval-test,compare-test,quality}

A trained classifier's folder (`train/`) holds its own validation evaluation (`train/eval-val/`), which
mining reads; a mining split other than val gets its own `eval-<split>` stage.

Every folder that adds synthetic images holds them with a `manifest.csv` (the manifest contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.csv"
# Stages of an arm's round that add synthetic images, in the order they run.
SYNTHETIC_STAGES: dict[str, tuple[str, ...]] = {
    "real": (),
    "mined": ("vary", "prompted"),
    "classical": ("augment",),
    "random": ("generate",),
}


@dataclass(frozen=True)
class ModelKey:
    """One trained classifier of the run: an arm after a round, for one seed."""

    arm: str
    round: int
    seed: int

    @property
    def prefix(self) -> str:
        return f"seed-{self.seed}/round-{self.round}/{self.arm}"

    def stage(self, leaf: str) -> str:
        return f"{self.prefix}/{leaf}"

    @property
    def label(self) -> str:
        return f"{self.arm} r{self.round} s{self.seed}"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    # shared stages
    DATA = "data"
    BASE = "base"
    FINETUNE = "finetune"

    @property
    def manifest(self) -> Path:
        return self.root / self.DATA / MANIFEST_NAME

    @property
    def base_record(self) -> Path:
        return self.root / self.BASE / "base.json"  # written by the base stage

    @property
    def adapter(self) -> Path:
        return self.root / self.FINETUNE / "adapter"

    def path(self, stage: str) -> Path:
        return self.root / stage

    def model(self, key: ModelKey) -> Path:
        """The trained classifier folder (`model.safetensors`, `classifier.json`, `eval-val/`)."""
        return self.path(key.stage("train"))

    def evaluation(self, key: ModelKey, split: str) -> Path:
        """The folder `evaluate` wrote (`metrics.json`, `predictions.csv`, ...); on the validation split
        it is the one the trainer writes for its selected model."""
        if split == "val":
            return self.model(key) / "eval-val"
        return self.path(key.stage(f"eval-{split}"))

    def comparison(self, key: ModelKey) -> Path:
        return self.path(key.stage("compare-test")) / "compare.json"

    def synthetic_manifests(self, key: ModelKey) -> list[Path]:
        """The synthetic manifests this arm added in this round (not earlier rounds) that hold images."""
        paths = [self.path(key.stage(leaf)) / MANIFEST_NAME for leaf in SYNTHETIC_STAGES[key.arm]]
        return [p for p in paths if has_rows(p)]


def has_rows(manifest: Path) -> bool:
    """A manifest file with at least one image (a round that kept nothing writes only the header)."""
    if not manifest.is_file():
        return False
    with open(manifest, encoding="utf-8") as handle:
        return handle.readline() != "" and handle.readline().strip() != ""
