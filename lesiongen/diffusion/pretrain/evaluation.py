"""Progress metrics of pretraining samples, judged by a classifier trained on real images: class
fidelity and a domain feature distance (the synthetic-quality functions of `lesiongen.metrics`), and how
much of the class evidence in real images survives the VAE."""

from __future__ import annotations

import contextlib
import os

import torch


class SampleJudge:
    """Holds the classifier and the real images' features, so each evaluation only embeds the samples."""

    def __init__(self, classifier_dir: str | os.PathLike, real_uint8: torch.Tensor, classes: list[str],
                 device: torch.device):
        from lesiongen.classifier.models import load_classifier
        from lesiongen.classifier.predict import extract_features

        self.model, self.info = load_classifier(classifier_dir, device=device)
        self.classes = classes
        self.real_features = extract_features(self.model, self.info, real_uint8).double().cpu()

    def __call__(self, samples_uint8: torch.Tensor, labels: torch.Tensor) -> dict:
        from lesiongen.classifier.predict import predict_proba_and_features
        from lesiongen.metrics.fid import fid_shortfall, frechet_distance
        from lesiongen.metrics.quality import class_fidelity

        probs, fake = predict_proba_and_features(self.model, self.info, samples_uint8)
        result = {"class_fidelity": class_fidelity(probs.float(), labels.cpu(), self.classes, list(self.info.classes)),
                  "num_samples": len(labels)}
        fake = fake.double()
        shortfall = fid_shortfall(len(self.real_features), len(fake), fake.shape[1])
        result["domain_distance"] = None if shortfall else frechet_distance(self.real_features, fake)
        if shortfall:
            result["domain_distance_note"] = shortfall
        return result

    def reconstruction(self, vae, images_uint8: torch.Tensor, labels: torch.Tensor, *, autocast=None) -> dict:
        """The judge on VAE round trips of real images beside the originals.

        Samples are decoded by this VAE, so a class whose evidence (thin vessels, fine networks) it loses
        from real images is unlikely to come out right in samples either. Not a strict bound: guided
        samples can be more typical of their class than real images are.
        """
        from lesiongen.classifier.predict import predict_proba
        from lesiongen.metrics.quality import class_fidelity

        round_trips = vae_round_trip(vae, images_uint8, autocast=autocast)
        result = {"num_images": len(labels),
                  "rmse": float((round_trips.float() - images_uint8.float()).pow(2).mean().sqrt())}
        for name, images in (("round_trip", round_trips), ("original", images_uint8)):
            probs = predict_proba(self.model, self.info, images)
            fidelity = class_fidelity(probs, labels.cpu(), self.classes, list(self.info.classes))
            shares = [v for v in fidelity["per_class"].values() if v is not None]
            result[name] = {"balanced_accuracy": sum(shares) / len(shares), "per_class": fidelity["per_class"]}
        return result


@torch.no_grad()
def vae_round_trip(vae, images_uint8: torch.Tensor, *, batch_size: int = 64, autocast=None) -> torch.Tensor:
    """uint8 images -> encode (posterior mean) -> decode -> uint8 on the CPU, as inversion encodes them."""
    from lesiongen.synthesis.latents import decode, encode, to_model_pixels, to_uint8

    device, size = next(vae.parameters()).device, images_uint8.shape[-1]
    out = []
    for i in range(0, len(images_uint8), batch_size):
        pixels = to_model_pixels(images_uint8[i:i + batch_size], size, device=device, dtype=vae.dtype)
        with autocast() if autocast is not None else contextlib.nullcontext():
            out.append(to_uint8(decode(vae, encode(vae, pixels))))
    return torch.cat(out)
