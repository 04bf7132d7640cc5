"""Filters every variant must pass before anything trains on it.

- **Failed reconstruction** (per source image): the invert -> regenerate round trip is too far off, so
  the model does not represent this image and its variants are not variants *of it*. Judged by the
  inversion's own loss, the PSNR of the reconstruction against the VAE's encode -> decode of the input
  (the best any inversion can do with this VAE), so one threshold means the same for an SD 1.5 VAE and
  a small one; optionally also by an absolute floor on the PSNR against the input itself.
- **Off-class** (per variant): the judge classifier (a reference classifier, or the one being improved)
  gives the intended label a probability below a threshold.
- **Near-copy of a training image** (per variant): the memorisation check of `lesiongen.metrics.
  memorization` (perceptual hash in 8 orientations + classifier-feature nearest neighbour).
- **Near-copy of a held-out image** (per variant): the perceptual hash against the real val and test
  images. A variant that is a re-encoded copy of its own (val) source, or of any test image, would put
  that image into training. Hash only: classifier features of a variant are meant to stay close to its
  source, while the hash threshold (24 of 256 bits) sits below every pair of distinct derm-dev lesions.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

from lesiongen.metrics.memorization import DEFAULT_PHASH_THRESHOLD, MemorizationIndex


@dataclass
class FilterConfig:
    # Off-class: drop a variant whose p(label) is below this. Low on purpose: hard cases are the ones the
    # current classifier gets wrong, so a high bar set by that classifier would drop exactly the variants
    # wanted; only confidently-other-class ones go. A reference classifier can judge more strictly.
    min_label_prob: float = 0.1
    min_inversion_psnr: float | None = 20.0  # failed reconstruction: dB of reconstruction vs VAE round trip
    min_recon_psnr: float | None = None  # failed reconstruction: dB of reconstruction vs input (None: off)
    memorization: bool = True
    phash_threshold: int = DEFAULT_PHASH_THRESHOLD
    feature_threshold: float | str = "auto"
    reference_size: int = 128  # training images are decoded at this size for the memorisation index

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_label_prob < 1.0:
            raise ValueError(f"min_label_prob must be in [0, 1), got {self.min_label_prob}")
        if self.reference_size < 8:
            raise ValueError(f"reference_size must be >= 8 px, got {self.reference_size}")


def reconstruction_verdicts(scores: list[dict[str, float]], config: FilterConfig) -> list[str]:
    """'' for a usable reconstruction, else why it failed; `scores` are `RoundTrip.rows()`."""
    verdicts = []
    for score in scores:
        if config.min_inversion_psnr is not None and score["inversion_psnr"] < config.min_inversion_psnr:
            verdicts.append(f"failed-reconstruction: {score['inversion_psnr']:.1f} dB against the VAE's own "
                            f"reconstruction < {config.min_inversion_psnr:g} dB")
        elif config.min_recon_psnr is not None and score["recon_psnr"] < config.min_recon_psnr:
            verdicts.append(f"failed-reconstruction: {score['recon_psnr']:.1f} dB against the input "
                            f"< {config.min_recon_psnr:g} dB")
        else:
            verdicts.append("")
    return verdicts


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 -> uint8 at size x size (bicubic, antialiased): variants are compared at the size the
    reference images were decoded at."""
    if images.shape[-2:] == (size, size):
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


class VariantFilter:
    """Scores variants against the classifier and the training set and says which to keep."""

    def __init__(self, config: FilterConfig, classes: list[str], *, classifier=None,
                 memorization: MemorizationIndex | None = None, reference_ids: list[str] | None = None,
                 held_out: MemorizationIndex | None = None, held_out_ids: list[str] | None = None) -> None:
        self.config = config
        self.classes = classes
        self.classifier = classifier  # (model, ClassifierInfo) or None
        self.memorization = memorization
        self.reference_ids = reference_ids
        self.held_out = held_out  # hash-only index of the real val + test images
        self.held_out_ids = held_out_ids

    @property
    def size(self) -> int:
        return self.classifier[1].decode_size if self.classifier is not None else self.config.reference_size

    def score(self, images: torch.Tensor, labels: list[str]) -> pd.DataFrame:
        """One row per image: scores, one 0/1 column per filter (`off_class`, `near_copy`), `keep` and a
        readable `reject_reason`."""
        images = resize_uint8(images, self.size)
        frame = pd.DataFrame(index=range(len(images)))
        reasons: list[list[str]] = [[] for _ in range(len(images))]
        features = None
        if self.classifier is not None:
            from lesiongen.classifier.predict import predict_proba_and_features

            model, info = self.classifier
            probs, features = predict_proba_and_features(model, info, images)  # one pass for both filters
            index = torch.tensor([info.classes.index(label) for label in labels])
            frame["p_label"] = probs[torch.arange(len(images)), index].tolist()
            frame["pred"] = [info.classes[i] for i in probs.argmax(dim=1).tolist()]
            frame["off_class"] = (frame["p_label"] < self.config.min_label_prob).astype(int)
            for i in frame.index[frame["off_class"] == 1]:
                reasons[i].append(f"off-class: p({labels[i]}) = {frame.at[i, 'p_label']:.2f} "
                                  f"< {self.config.min_label_prob:g}")
        if self.memorization is not None:
            # an index with real features was built from the same classifier (build_memorization_index)
            features = features if self.memorization.real_features is not None else None
            found = self.memorization.query(images, features).to_frame(self.reference_ids)
            frame["nearest_train"] = found["nearest_real"]
            frame["phash_distance"] = found["phash_distance"]
            if "feature_distance" in found:
                frame["feature_distance"] = found["feature_distance"]
            frame["memorization_score"] = found["score"]
            frame["near_copy"] = found["flagged"].astype(int)
            for i in frame.index[frame["near_copy"] == 1]:
                reasons[i].append(f"near-copy of training image {frame.at[i, 'nearest_train']}")
        if self.held_out is not None:
            found = self.held_out.query(images).to_frame(self.held_out_ids)
            frame["nearest_held_out"] = found["nearest_real"]
            frame["held_out_phash_distance"] = found["phash_distance"]
            copies = found["flagged"].astype(int)
            frame["near_copy"] = frame["near_copy"] | copies if "near_copy" in frame else copies
            for i in frame.index[copies == 1]:
                reasons[i].append(f"near-copy of held-out image {frame.at[i, 'nearest_held_out']} "
                                  f"({frame.at[i, 'held_out_phash_distance']} bits): val/test images must not train")
        frame["reject_reason"] = ["; ".join(r) for r in reasons]
        frame["keep"] = [int(not r) for r in reasons]
        return frame


def build_memorization_index(train_images: torch.Tensor, groups: list[str], config: FilterConfig, *,
                             classifier=None) -> MemorizationIndex:
    """The training set as a nearest-neighbour index (hash always, classifier features when given)."""
    real_features = None
    if classifier is not None:
        from lesiongen.classifier.predict import extract_features

        real_features = extract_features(*classifier, train_images)
    return MemorizationIndex(train_images, real_features=real_features, groups=groups,
                             phash_threshold=config.phash_threshold,
                             feature_threshold=config.feature_threshold if real_features is not None else "auto")
