"""Clinical metrics against sklearn and hand-computed references; bootstrap and paired comparison."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from sklearn import metrics as skm

from lesiongen.metrics.bootstrap import bootstrap_ci, resample_weights
from lesiongen.metrics.clinical import (
    AUROC,
    Accuracy,
    BalancedAccuracy,
    ClinicalMetrics,
    ClinicalSpec,
    ConfusionMatrix,
    Sensitivity,
    SensitivityAtSpecificity,
    Specificity,
    SpecificityAtSensitivity,
    auroc,
    clinical_metrics,
    confusion_matrix,
    operating_points,
    sensitivity_at_specificity,
    specificity_at_sensitivity,
)
from lesiongen.metrics.compare import mcnemar, paired_comparison

CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")


def random_problem(n: int = 300, seed: int = 0, ties: bool = True):
    """Probabilities that carry signal about the labels, rounded so that scores tie."""
    rng = np.random.default_rng(seed)
    target = rng.integers(0, len(CLASSES), n)
    logits = rng.normal(size=(n, len(CLASSES))) + 1.5 * np.eye(len(CLASSES))[target]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    if ties:
        probs = np.round(probs, 1) + 1e-9 * np.arange(len(CLASSES))  # ties within a class column, no argmax ties
    weights = rng.integers(0, 4, n).astype(float)
    return torch.tensor(probs), torch.tensor(target), torch.tensor(weights)


def sklearn_sens_at_spec(y, s, level, w=None):
    fpr, tpr, _ = skm.roc_curve(y, s, sample_weight=w, drop_intermediate=False)
    return tpr[(1 - fpr) >= level - 1e-12].max()


def sklearn_spec_at_sens(y, s, level, w=None):
    fpr, tpr, _ = skm.roc_curve(y, s, sample_weight=w, drop_intermediate=False)
    return (1 - fpr)[tpr >= level - 1e-12].max()


@pytest.mark.parametrize("weighted", [False, True])
def test_panel_matches_sklearn(weighted):
    probs, target, weights = random_problem()
    w = weights if weighted else None
    w_np = weights.numpy() if weighted else None
    spec = ClinicalSpec(CLASSES)
    got = clinical_metrics(probs, target, spec, w)
    y, pred = target.numpy(), probs.argmax(1).numpy()

    cm = skm.confusion_matrix(y, pred, labels=range(7), sample_weight=w_np)
    assert torch.allclose(confusion_matrix(probs.argmax(1), target, 7, w), torch.tensor(cm, dtype=torch.float64))
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred, sample_weight=w_np))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred, sample_weight=w_np))
    recall = skm.recall_score(y, pred, labels=range(7), average=None, sample_weight=w_np)
    for i, name in enumerate(CLASSES):
        assert got[f"sensitivity/{name}"] == pytest.approx(recall[i])
        negatives = cm.sum() - cm[i].sum()
        assert got[f"specificity/{name}"] == pytest.approx((negatives - (cm[:, i].sum() - cm[i, i])) / negatives)
        assert got[f"auroc/{name}"] == pytest.approx(skm.roc_auc_score(y == i, probs[:, i].numpy(), sample_weight=w_np))
    per_class = [skm.roc_auc_score(y == i, probs[:, i].numpy(), sample_weight=w_np) for i in range(7)]
    assert got["macro_auroc"] == pytest.approx(np.mean(per_class))
    mel = CLASSES.index("mel")
    for level in (0.8, 0.9):
        assert got[spec.sens_at_spec_name(level)] == pytest.approx(
            sklearn_sens_at_spec(y == mel, probs[:, mel].numpy(), level, w_np))
        assert got[spec.spec_at_sens_name(level)] == pytest.approx(
            sklearn_spec_at_sens(y == mel, probs[:, mel].numpy(), level, w_np))


def test_macro_auroc_matches_sklearn_multiclass_ovr():
    probs, target, _ = random_problem(ties=False)
    expected = skm.roc_auc_score(target.numpy(), probs.numpy(), multi_class="ovr", average="macro")
    assert clinical_metrics(probs, target, ClinicalSpec(CLASSES))["macro_auroc"] == pytest.approx(expected)
    assert float(AUROC(7)(probs, target)) == pytest.approx(expected)


def test_operating_points_by_hand():
    # 3 positives (0.9, 0.8, 0.3) and 7 negatives; an image is called positive when its score >= t.
    scores = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.7, 0.6, 0.4, 0.2, 0.1, 0.05])
    positive = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    # t=0.9: sens 1/3, spec 7/7; t=0.8: sens 2/3, spec 6/7; t=0.7: 2/3, 5/7; ... t=0.3: sens 3/3, spec 3/7.
    value, threshold = sensitivity_at_specificity(scores, positive, 0.8)
    assert float(value) == pytest.approx(2 / 3) and float(threshold) == pytest.approx(0.8)
    value, threshold = sensitivity_at_specificity(scores, positive, 0.9)
    assert float(value) == pytest.approx(1 / 3) and float(threshold) == pytest.approx(0.9)
    value, threshold = specificity_at_sensitivity(scores, positive, 0.75)
    assert float(value) == pytest.approx(3 / 7) and float(threshold) == pytest.approx(0.3)
    value, _ = specificity_at_sensitivity(scores, positive, 0.6)
    assert float(value) == pytest.approx(6 / 7)
    # AUROC = P(score of a positive > score of a negative), ties count 1/2.
    pairs = [(p, n) for p in scores[positive] for n in scores[~positive]]
    expected = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert float(auroc(scores, positive)) == pytest.approx(expected)


def test_undefined_metrics_are_nan_and_balanced_accuracy_skips_absent_classes():
    probs = torch.eye(7, dtype=torch.float64)[[0, 1, 1, 0]]
    target = torch.tensor([0, 1, 0, 0])  # mel (4) has no positives
    got = clinical_metrics(probs, target, ClinicalSpec(CLASSES))
    assert math.isnan(got["auroc/mel"]) and math.isnan(got["sensitivity/mel"])
    assert math.isnan(got["mel_sensitivity@specificity=0.90"])
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 1.0) / 2)  # only classes 0 and 1 are present


def test_spec_validation_and_default():
    with pytest.raises(ValueError, match="positive class"):
        ClinicalSpec(("a", "b"), positive_class="mel")
    with pytest.raises(ValueError, match="operating points"):
        ClinicalSpec(CLASSES, at_specificity=(1.2,))
    assert ClinicalSpec.default_for(("a", "b")).positive_class is None
    assert operating_points(torch.rand(4, 2), torch.tensor([0, 1, 0, 1]), ClinicalSpec.default_for(("a", "b"))) == {}


def test_metric_classes_accumulate_and_merge_like_ddp():
    """Two 'processes' each see half the images; merging their states equals one pass over all."""
    probs, target, _ = random_problem(n=200, seed=1)
    spec = ClinicalSpec(CLASSES)
    mel = CLASSES.index("mel")
    makers = {
        "accuracy": lambda: Accuracy(7), "balanced_accuracy": lambda: BalancedAccuracy(7),
        "sensitivity": lambda: Sensitivity(7), "specificity": lambda: Specificity(7),
        "confmat": lambda: ConfusionMatrix(7), "macro_auroc": lambda: AUROC(7),
        "auroc": lambda: AUROC(7, average=None),
        "sens@spec": lambda: SensitivityAtSpecificity(7, mel, 0.9),
        "spec@sens": lambda: SpecificityAtSensitivity(7, mel, 0.8),
    }
    reference = clinical_metrics(probs, target, spec)
    for name, make in makers.items():
        rank0, rank1 = make(), make()
        rank0.update(probs[:120], target[:120])
        rank1.update(probs[120:150], target[120:150])
        rank1.update(probs[150:], target[150:])
        rank0.merge_state(rank1)
        merged = rank0.compute()
        single = make()
        single.update(probs, target)
        assert torch.allclose(merged, single.compute(), equal_nan=True), name
        if name in ("accuracy", "balanced_accuracy", "macro_auroc"):
            assert float(merged) == pytest.approx(reference[name])
    batch_value = SensitivityAtSpecificity(7, mel, 0.9)(probs, target)  # forward: the batch's own value
    assert float(batch_value) == pytest.approx(reference["mel_sensitivity@specificity=0.90"])
    panel = ClinicalMetrics(spec)
    panel.update(probs[:50], target[:50])
    panel.update(probs[50:], target[50:])
    assert panel.compute() == pytest.approx(reference, nan_ok=True)


def test_metric_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        BalancedAccuracy(7).update(torch.rand(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="class indices"):
        BalancedAccuracy(7).update(torch.rand(2, 7), torch.tensor([0, 9]))


def test_bootstrap_resamples_whole_lesions_and_is_seeded():
    groups = ["a", "a", "b", "c", "c", "c", "d"]
    draws = list(resample_weights(groups, 50, seed=3))
    for weights in draws:
        assert weights[0] == weights[1] and weights[3] == weights[4] == weights[5]
        assert float(weights[[0, 2, 3, 6]].sum()) == 4.0  # four lesions drawn per resample
    again = list(resample_weights(groups, 50, seed=3))
    assert all(torch.equal(x, y) for x, y in zip(draws, again))
    assert not all(torch.equal(x, y) for x, y in zip(draws, resample_weights(groups, 50, seed=4)))


def test_bootstrap_interval_brackets_estimate_and_widens_with_clustering():
    probs, target, _ = random_problem(n=120, seed=2, ties=False)
    spec = ClinicalSpec(CLASSES)
    # Every lesion photographed 4 times: 480 images but only 120 independent lesions.
    probs4, target4 = probs.repeat_interleave(4, 0), target.repeat_interleave(4)
    lesion_groups = np.repeat(np.arange(120), 4).tolist()
    image_groups = list(range(480))

    def statistic(w):
        return clinical_metrics(probs4, target4, spec, w)

    point = clinical_metrics(probs4, target4, spec)["balanced_accuracy"]
    by_lesion = bootstrap_ci(statistic, lesion_groups, n_resamples=200, seed=0)["balanced_accuracy"]
    by_image = bootstrap_ci(statistic, image_groups, n_resamples=200, seed=0)["balanced_accuracy"]
    assert by_lesion[0] < point < by_lesion[1]
    # Ignoring the clustering would claim about half the width (sqrt(4)); lesion resampling does not.
    assert (by_lesion[1] - by_lesion[0]) > 1.5 * (by_image[1] - by_image[0])


def test_mcnemar_exact_against_binomial_by_hand():
    a = [True] * 10 + [True] * 5 + [False] * 1 + [False] * 4
    b = [True] * 10 + [False] * 5 + [True] * 1 + [False] * 4
    result = mcnemar(a, b)
    assert (result.only_a_correct, result.only_b_correct) == (5, 1)
    assert result.p_value == pytest.approx(2 * sum(math.comb(6, k) for k in range(0, 2)) / 2 ** 6)
    assert result.p_value == pytest.approx(binomtest(1, 6, 0.5).pvalue)
    assert result.statistic == pytest.approx((abs(5 - 1) - 1) ** 2 / 6)
    assert mcnemar(a, a).p_value == 1.0


def test_paired_comparison_of_a_model_with_itself_and_with_a_better_one():
    probs, target, _ = random_problem(n=150, seed=5, ties=False)
    groups = [i // 2 for i in range(150)]
    spec = ClinicalSpec(CLASSES)
    same = paired_comparison(probs, probs, target, groups, spec, n_resamples=50)
    assert same["metrics"]["balanced_accuracy"]["difference"] == 0.0
    assert same["metrics"]["balanced_accuracy"]["ci95"] == (0.0, 0.0)
    assert same["mcnemar"]["p_value"] == 1.0
    better = 0.5 * probs + 0.5 * torch.nn.functional.one_hot(target, 7).double()
    result = paired_comparison(probs, better, target, groups, spec, n_resamples=100)
    row = result["metrics"]["balanced_accuracy"]
    assert row["difference"] > 0 and row["ci95"][0] > 0 and row["p_b_not_better"] == 0.0
    assert result["mcnemar"]["only_b_correct"] > result["mcnemar"]["only_a_correct"]
    assert result["mcnemar"]["p_value"] < 1e-3


@pytest.mark.parametrize("weighted", [False, True])
def test_thresholds_fixed_on_validation_are_applied_unchanged(weighted):
    val_probs, val_target, _ = random_problem(300, seed=1)
    probs, target, weights = random_problem(200, seed=2)
    weights = weights if weighted else None
    spec = ClinicalSpec.default_for(CLASSES)
    chosen = {name: t for name, (_, t) in operating_points(val_probs, val_target, spec).items()}
    fixed = clinical_metrics(probs, target, ClinicalSpec(CLASSES, fixed_thresholds=tuple(chosen.items())), weights)
    mel = CLASSES.index("mel")
    y, w = (target == mel).numpy(), None if weights is None else weights.numpy()
    for point, threshold in chosen.items():
        called = (probs[:, mel] >= threshold).numpy()
        sensitivity, specificity = spec.fixed_point_names(point)
        assert fixed[sensitivity] == pytest.approx(skm.recall_score(y, called, sample_weight=w))
        assert fixed[specificity] == pytest.approx(skm.recall_score(~y, ~called, sample_weight=w))
    assert spec.fixed_point_names("mel_sensitivity@specificity=0.90") == (
        "mel_sensitivity@val_threshold(specificity=0.90)", "mel_specificity@val_threshold(specificity=0.90)")
    # without fixed thresholds the panel is the same less the fixed points
    plain = clinical_metrics(probs, target, spec, weights)
    assert set(plain) < set(fixed)
