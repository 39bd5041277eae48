"""Feature extractors: Inception from a local file only (random weights here), the digits classifier, wrappers."""

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

from diffdistill.errors import UserError
from diffdistill.metrics import (
    DigitsFeatures,
    InceptionV3Features,
    ModuleFeatures,
    fid_from_features,
    load_digits_images,
    load_or_train_digits_classifier,
)
from diffdistill.metrics.digits import DigitsRecipe
from diffdistill.metrics.features import _weights_only_torch_load

pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_missing_inception_weights_message(tmp_path_factory):
    with pytest.raises(UserError) as err:
        InceptionV3Features()
    msg = str(err.value)
    assert "\n" not in msg
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert str(tmp_path_factory.getbasetemp() / "diffdistill-cache") in msg  # where it looked
    assert "--inception-weights FILE" in msg
    with pytest.raises(UserError, match=r"not found: /nonexistent/w\.pth .*--inception-weights FILE"):
        InceptionV3Features("/nonexistent/w.pth")


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    """The torch-fidelity architecture with random weights, saved as a plain state dict (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_loads_local_file_and_matches_torchmetrics_legacy_protocol(random_inception_file):
    from torchmetrics.image.fid import NoTrainInceptionV3

    ext = InceptionV3Features(random_inception_file)
    assert ext.dim == 2048 and ext.resize == "tf1-bilinear-299"
    assert ext.weights_hash == hashlib.sha256(random_inception_file.read_bytes()).hexdigest()
    assert not ext.is_official and ext.info()["weights_file"] == str(random_inception_file)
    u8 = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    u8[1] = u8[1, :1]  # the second image is grey
    images = (u8.float() + 0.5 - 128) / 127.5  # maps back to exactly u8 (EDM's x * 127.5 + 128, truncated)
    feats = ext(images)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    with _weights_only_torch_load():  # torchmetrics' legacy protocol (antialias=False) on the same file
        tm = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(random_inception_file), antialias=False)
    torch.testing.assert_close(feats, tm(u8), rtol=1e-4, atol=1e-5)
    # a one-channel image is repeated to three channels
    torch.testing.assert_close(ext(images[1:, :1]), feats[1:], rtol=1e-4, atol=1e-5)


def test_inception_never_unpickles(tmp_path):
    import datetime

    bad = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    # any object outside torch's weights-only allow-list needs the full unpickler, which is refused
    torch.save({"Conv2d_1a_3x3.conv.weight": datetime.date(2015, 12, 5)}, bad)
    with pytest.raises(UserError, match="is not a plain Inception-v3 2015 state dict"):
        InceptionV3Features(bad)


def test_digits_classifier_accuracy_and_cache(tmp_path_factory):
    model, acc, path = load_or_train_digits_classifier()
    assert acc >= 0.95
    assert path.name == f"digits-classifier-{DigitsRecipe().sha()}.safetensors" and path.is_file()
    again, acc2, _ = load_or_train_digits_classifier()  # read back from the cache, not retrained
    assert acc2 == acc
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert DigitsRecipe(epochs=3).sha() != DigitsRecipe().sha()


def test_digits_features_any_resolution_and_channels():
    ext = DigitsFeatures()
    assert ext.info()["test_accuracy"] >= 0.95 and ext.dim == 64
    x16, y = load_digits_images(16)
    f16 = ext(x16)
    assert f16.shape == (1797, 64)
    torch.testing.assert_close(ext(x16.repeat(1, 3, 1, 1)), f16)  # RGB -> grey
    f32 = ext(torch.nn.functional.interpolate(x16, size=32, mode="bilinear", align_corners=False))
    f8 = ext(load_digits_images(8)[0])
    # a resolution round trip moves the features a little, far less than a change of class does
    by_class = torch.stack([f16[y == c].mean(0) for c in range(10)])
    class_gap = torch.cdist(by_class, by_class)[~torch.eye(10, dtype=torch.bool)].min()
    assert (f32 - f16).norm(dim=1).mean() < class_gap / 2
    assert (f8 - f16).norm(dim=1).mean() < 1e-4  # 8 -> 16 is exactly the dataset's own resize


def test_digits_fid_halves_small_noise_large():
    ext = DigitsFeatures()
    x, y = load_digits_images(16)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    a, b = ext(x[perm[:898]]), ext(x[perm[898:]])
    noisy = ext((x[perm[898:]] + 0.5 * torch.randn(899, 1, 16, 16, generator=torch.Generator().manual_seed(1)))
                .clamp(-1, 1))
    only_ones = ext(x[y == 1])
    halves, with_noise, one_class = fid_from_features(a, b), fid_from_features(a, noisy), fid_from_features(a, only_ones)
    assert halves < with_noise / 5 and halves < one_class / 5


def test_module_features_wraps_any_module():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(2))
    ext = ModuleFeatures(net, name="tiny")
    feats = ext(torch.zeros(5, 3, 8, 8))
    assert feats.shape == (5, 16) and ext.dim == 16 and len(ext.weights_hash) == 64
    info = ext.info()
    assert info["name"] == "tiny" and info["resize"] == "none"
    with torch.no_grad():
        net[0].weight.add_(1)
    assert ModuleFeatures(net).weights_hash != ext.weights_hash
    assert np.isfinite(fid_from_features(ext(torch.randn(20, 3, 8, 8)), ext(torch.randn(20, 3, 8, 8))))
