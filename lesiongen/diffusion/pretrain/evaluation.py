"""Progress metrics of pretraining samples, judged by a classifier trained on real images: class
fidelity and a domain feature distance (the synthetic-quality functions of `lesiongen.metrics`)."""

from __future__ import annotations

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
