"""Datasets: digits, image folders, toy mixtures, prompt files, and their one-line user errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffdistill.config import DataConfig
from diffdistill.data import DigitsDataset, ImageFolderDataset, PromptDataset, Toy2DDataset, build_dataset
from diffdistill.errors import UserError
from diffdistill.toy import GaussianMixture


def test_digits_shapes_range_labels_and_split():
    ds = DigitsDataset(resolution=16)
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.channels == 1 and ds.resolution == 16
    image, label = ds[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32 and label.dtype == torch.long
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert ds.images.min() == -1 and ds.images.max() > 0.99  # the full range is used
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images[0], dtype=torch.float32)
    torch.testing.assert_close(DigitsDataset(resolution=8)[0][0][0], raw / 8 - 1)  # 0..16 -> [-1, 1]
    train, test = DigitsDataset(16, "train"), DigitsDataset(16, "test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    torch.testing.assert_close(test[1][0], ds[5][0])  # every 5th image is a test image
    assert DigitsDataset(16, channels=3)[0][0].shape == (3, 16, 16)
    images, labels = next(iter(DataLoader(ds, batch_size=8)))
    assert images.shape == (8, 1, 16, 16) and labels.shape == (8,)


def _write(path, size, mode, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 1 if mode == "L" else 3
    array = np.full((size[1], size[0], channels), value, dtype=np.uint8)
    Image.fromarray(array[..., 0] if channels == 1 else array, mode).save(path)


def test_image_folder_rgb_labels_resize_and_crop(tmp_path):
    _write(tmp_path / "dogs" / "0.png", (20, 12), "RGB", 255)
    _write(tmp_path / "cats" / "0.png", (12, 12), "RGB", 0)
    _write(tmp_path / "cats" / "1.jpg", (8, 30), "RGB", 128)
    ds = ImageFolderDataset(tmp_path, resolution=8)
    assert ds.class_names == ["cats", "dogs"] and ds.num_classes == 2 and ds.channels == 3 and len(ds) == 3
    labels = sorted(int(ds[i][1]) for i in range(3))
    assert labels == [0, 0, 1]
    for i in range(3):
        image, _ = ds[i]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32
        assert image.min() >= -1 and image.max() <= 1
    white = next(ds[i][0] for i in range(3) if int(ds[i][1]) == 1)
    torch.testing.assert_close(white, torch.ones(3, 8, 8))
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch[0].shape == (3, 3, 8, 8)


def test_image_folder_centre_crop(tmp_path):
    array = np.zeros((8, 24, 3), dtype=np.uint8)
    array[:, 8:16] = 255  # only the central 8 columns are white
    Image.fromarray(array, "RGB").save(tmp_path / "wide.png")
    torch.testing.assert_close(ImageFolderDataset(tmp_path, resolution=8)[0][0], torch.ones(3, 8, 8))


def test_image_folder_grey_flat_and_conversion(tmp_path):
    _write(tmp_path / "a.png", (10, 10), "L", 0)
    _write(tmp_path / "b.png", (10, 10), "L", 255)
    ds = ImageFolderDataset(tmp_path, resolution=4)
    assert ds.channels == 1 and ds.num_classes is None and ds.class_names == []
    image, label = ds[1]
    assert image.shape == (1, 4, 4) and int(label) == -1
    torch.testing.assert_close(image, torch.ones(1, 4, 4))
    assert ImageFolderDataset(tmp_path, resolution=4, channels=3)[0][0].shape == (3, 4, 4)


def test_image_folder_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty has no images"):
        ImageFolderDataset(tmp_path / "empty", 8)
    with pytest.raises(UserError, match=r"missing does not exist"):
        ImageFolderDataset(tmp_path / "missing", 8)
    bad = tmp_path / "bad"
    _write(bad / "a.png", (8, 8), "RGB", 10)
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"cannot read image .*broken\.png"):
        ImageFolderDataset(bad, 8)
    mixed = tmp_path / "mixed"
    _write(mixed / "a.png", (8, 8), "RGB", 10)
    _write(mixed / "b.png", (8, 8), "L", 10)
    with pytest.raises(UserError, match=r"image .*b\.png has 1 channel\(s\) but a\.png has 3"):
        ImageFolderDataset(mixed, 8)
    assert ImageFolderDataset(mixed, 8, channels=3)[1][0].shape == (3, 8, 8)
    with pytest.raises(UserError, match=r"data\.channels must be 1 or 3"):
        ImageFolderDataset(mixed, 8, channels=4)
    both = tmp_path / "both"
    _write(both / "top.png", (8, 8), "RGB", 10)
    _write(both / "cls" / "x.png", (8, 8), "RGB", 10)
    with pytest.raises(UserError, match=r"mixes images at its top level \(top\.png\)"):
        ImageFolderDataset(both, 8)


def test_toy_and_prompt_datasets(tmp_path):
    ds = Toy2DDataset(size=500, seed=3)
    assert len(ds) == 500 and ds[0][0].shape == (2,) and int(ds[0][1]) == -1 and ds.num_classes is None
    assert torch.equal(ds.samples, Toy2DDataset(size=500, seed=3).samples)
    assert not torch.equal(ds.samples, Toy2DDataset(size=500, seed=4).samples)
    # mode weights of the default mixture (0.5 / 0.3 / 0.2) within sampling error
    torch.testing.assert_close(ds.mixture.mode_weights(ds.samples), torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                               atol=0.07, rtol=0)
    one = Toy2DDataset(size=10, mixture=GaussianMixture([[5.0, 5.0, 5.0]], [0.01], [1.0]))
    assert one[0][0].shape == (3,) and (one.samples - 5).abs().max() < 0.1
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\n   \n  a dog on a log  \n")
    assert list(PromptDataset(prompts)) == ["a cat", "a dog on a log"]
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(UserError, match=r"blank\.txt has no prompts"):
        PromptDataset(tmp_path / "blank.txt")
    with pytest.raises(UserError, match=r"nope\.txt does not exist"):
        PromptDataset(tmp_path / "nope.txt")


def test_build_dataset_from_config(tmp_path):
    assert isinstance(build_dataset(DataConfig(name="digits", resolution=8)), DigitsDataset)
    assert len(build_dataset(DataConfig(name="digits", resolution=8), split="test")) == 360
    assert isinstance(build_dataset(DataConfig(name="toy2d")), Toy2DDataset)
    _write(tmp_path / "img" / "a.png", (8, 8), "RGB", 10)
    folder = build_dataset(DataConfig(name="folder", path=str(tmp_path / "img"), resolution=4))
    assert folder.sample_shape == (3, 4, 4)
    with pytest.raises(UserError, match=r"data\.path must be set for data\.name=folder"):
        build_dataset(DataConfig(name="folder"))
    with pytest.raises(UserError, match=r"unknown data\.name 'digit'; did you mean 'digits'\?"):
        build_dataset(DataConfig(name="digit"))
