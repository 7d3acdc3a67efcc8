"""Tests for ofq_ray.data on the real Fashion-MNIST files, sklearn digits and a tiny real image folder."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ofq_ray.data import (
    FASHION_MNIST_DEFAULT_ROOT,
    DatasetInfo,
    DatasetMissingError,
    InMemoryImageDataset,
    Loader,
    build_datasets,
    build_loader,
)


def build_in_memory(
    name: str, root: str | None, img_size: int, **subsets: int
) -> tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]:
    train_set, val_set, info = build_datasets(name, root, img_size, **subsets)
    assert isinstance(train_set, InMemoryImageDataset) and isinstance(val_set, InMemoryImageDataset)
    return train_set, val_set, info


@pytest.fixture(scope="module")
def fashion() -> tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]:
    return build_in_memory("fashion_mnist", None, 28)


@pytest.fixture(scope="module")
def digits() -> tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]:
    return build_in_memory("digits", None, 8, seed=0)


def with_index_labels(dataset: InMemoryImageDataset) -> InMemoryImageDataset:
    """The same images labelled by their own index, so a batch's labels say which examples it holds."""
    return InMemoryImageDataset(dataset.images, torch.arange(len(dataset)))


def normalized(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def collect(loader: Loader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([images for images, _ in batches]), torch.cat([labels for _, labels in batches])


def test_fashion_mnist_matches_the_official_files(
    fashion: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo],
) -> None:
    train_set, val_set, info = fashion
    assert (len(train_set), len(val_set)) == (60000, 10000)
    assert train_set.images.shape == (60000, 1, 28, 28) and train_set.images.dtype == torch.uint8
    assert val_set.images.shape == (10000, 1, 28, 28)
    assert train_set.labels.dtype == torch.int64
    assert int(train_set.labels.min()) == 0 and int(train_set.labels.max()) == 9
    assert torch.bincount(train_set.labels).tolist() == [6000] * 10
    assert torch.bincount(val_set.labels).tolist() == [1000] * 10
    # Both splits start with an ankle boot (class 9), checked against the raw label files.
    for file_name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(os.path.join(FASHION_MNIST_DEFAULT_ROOT, file_name)) as file:
            assert file.read(9)[8] == 9
    assert int(train_set.labels[0]) == 9 and int(val_set.labels[0]) == 9
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 1, 28)
    assert (info.train_size, info.val_size) == (60000, 10000)
    assert info.mean[0] == pytest.approx(0.286, abs=1e-3) and info.std[0] == pytest.approx(0.353, abs=1e-3)


def test_fashion_eval_pass_is_normalized(
    fashion: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo],
) -> None:
    _, val_set, info = fashion
    loader = build_loader(val_set, info, batch_size=1000, train=False)
    images, labels = collect(loader)
    assert images.dtype == torch.float32 and images.shape == (10000, 1, 28, 28)
    assert abs(float(images.mean())) < 0.05 and abs(float(images.std()) - 1.0) < 0.05
    assert torch.equal(labels, val_set.labels)


def test_train_shards_are_disjoint_and_equal_in_length(
    digits: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo],
) -> None:
    train_set, _, info = digits
    dataset = with_index_labels(train_set)
    batch_size, world_size = 64, 2
    shards = []
    for rank in range(world_size):
        loader = build_loader(
            dataset, info, batch_size=batch_size, train=True, rank=rank, world_size=world_size, seed=3
        )
        loader.set_epoch(5)
        batches = list(loader)
        assert len(batches) == len(loader) and all(len(labels) == batch_size for _, labels in batches)
        shards.append(torch.cat([labels for _, labels in batches]))
    assert len(shards[0]) == len(shards[1])
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    covered = len(set(torch.cat(shards).tolist()))
    assert len(dataset) - world_size * batch_size < covered <= len(dataset)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_shards_hold_every_example_once(
    digits: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo], world_size: int
) -> None:
    _, val_set, info = digits
    dataset = with_index_labels(val_set)
    loaders = [
        build_loader(dataset, info, batch_size=64, train=False, rank=rank, world_size=world_size)
        for rank in range(world_size)
    ]
    shards = [[labels for _, labels in loader] for loader in loaders]
    # Eval keeps the partial last batch, and len() counts it.
    assert [len(batches) for batches in shards] == [len(loader) for loader in loaders]
    indices = torch.cat([labels for batches in shards for labels in batches])
    assert torch.equal(indices.sort().values, torch.arange(len(val_set)))


def test_set_epoch_reshuffles_and_same_seed_epoch_reproduces(
    digits: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo],
) -> None:
    train_set, _, info = digits
    dataset = with_index_labels(train_set)

    def epoch(seed: int, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        loader = build_loader(dataset, info, batch_size=32, train=True, seed=seed)
        loader.set_epoch(number)
        return collect(loader)

    images_0, order_0 = epoch(seed=1, number=0)
    _, order_1 = epoch(seed=1, number=1)
    assert not torch.equal(order_0, order_1)
    assert not torch.equal(order_0, order_0.sort().values)
    again_images, again_order = epoch(seed=1, number=0)
    assert torch.equal(order_0, again_order) and torch.equal(images_0, again_images)
    assert not torch.equal(order_0, epoch(seed=2, number=0)[1])


def test_augment_crops_and_flips_each_sample(
    digits: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo],
) -> None:
    train_set, _, info = digits
    dataset = with_index_labels(train_set)
    loader = build_loader(dataset, info, batch_size=64, train=True, seed=0, augment=True)
    images, indices = next(iter(loader))
    assert images.shape == (64, 1, 8, 8) and images.dtype == torch.float32
    plain = normalized(dataset.images[indices], info)
    assert not torch.allclose(images, plain)
    # Every augmented sample is one of the 5 x 5 crops of the 2-pixel zero-padded image, maybe flipped.
    padded = torch.nn.functional.pad(plain, (2, 2, 2, 2), value=float(normalized(torch.zeros(1, 1, 1, 1), info)))
    for sample, source in zip(images, padded, strict=True):
        candidates = [
            crop
            for top in range(5)
            for left in range(5)
            for crop in (
                source[:, top : top + 8, left : left + 8],
                source[:, top : top + 8, left : left + 8].flip(-1),
            )
        ]
        assert any(torch.allclose(sample, crop, atol=1e-5) for crop in candidates)


def test_without_augment_loader_returns_normalized_stored_images(
    digits: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo],
) -> None:
    train_set, val_set, info = digits
    dataset = with_index_labels(train_set)
    train_images, train_indices = collect(build_loader(dataset, info, batch_size=50, train=True, augment=False))
    assert torch.allclose(train_images, normalized(dataset.images[train_indices], info), atol=1e-5)
    val_images, val_labels = collect(build_loader(val_set, info, batch_size=50, train=False))
    assert torch.allclose(val_images, normalized(val_set.images, info), atol=1e-5)
    assert torch.equal(val_labels, val_set.labels)


def test_digits_split_is_seeded_and_complete(
    digits: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo],
) -> None:
    train_set, val_set, info = digits
    assert (len(train_set), len(val_set)) == (1497, 300) == (info.train_size, info.val_size)
    assert train_set.images.dtype == torch.uint8 and int(train_set.images.max()) == 255
    all_labels = torch.cat([train_set.labels, val_set.labels])
    assert torch.bincount(all_labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    same_train, _, _ = build_in_memory("digits", None, 8, seed=0)
    other_train, _, _ = build_in_memory("digits", None, 8, seed=1)
    assert torch.equal(same_train.images, train_set.images)
    assert not torch.equal(other_train.images, train_set.images)


def test_subsets_are_seeded() -> None:
    train_a, val_a, info = build_in_memory("digits", None, 8, train_subset=200, val_subset=50, seed=4)
    train_b, _, _ = build_in_memory("digits", None, 8, train_subset=200, val_subset=50, seed=4)
    train_c, _, _ = build_in_memory("digits", None, 8, train_subset=200, val_subset=50, seed=5)
    assert (info.train_size, info.val_size) == (200, 50) == (len(train_a), len(val_a))
    assert torch.equal(train_a.images, train_b.images)
    assert not torch.equal(train_a.images, train_c.images)
    _, _, whole = build_datasets("digits", None, 8, train_subset=10**6)
    assert whole.train_size == 1497


def test_digits_resized_to_32() -> None:
    train_set, val_set, info = build_in_memory("digits", None, 32)
    assert train_set.images.shape == (1497, 1, 32, 32)
    assert val_set.images.shape == (300, 1, 32, 32) and val_set.images.dtype == torch.uint8
    assert info.img_size == 32
    images, _ = next(iter(build_loader(train_set, info, batch_size=16, train=True)))
    assert images.shape == (16, 1, 32, 32)


def test_batch_larger_than_train_shard_is_rejected(
    digits: tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo],
) -> None:
    _, val_set, info = digits
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(val_set, info, batch_size=256, train=True, world_size=2)


def write_image_folder(root: Path, classes: int = 2, per_class: int = 4) -> None:
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for class_index in range(classes):
            folder = root / split / f"class_{class_index}"
            folder.mkdir(parents=True)
            for image_index in range(per_class):
                pixels = torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8, generator=generator)
                Image.fromarray(pixels.numpy()).save(folder / f"{image_index}.png")


def test_imagefolder_loaders(tmp_path: Path) -> None:
    write_image_folder(tmp_path)
    train_set, val_set, info = build_datasets("imagefolder", str(tmp_path), 32)
    assert (info.num_classes, info.in_chans, info.img_size) == (2, 3, 32)
    assert (info.train_size, info.val_size) == (8, 8)
    train_loader = build_loader(train_set, info, batch_size=4, train=True)
    train_loader.set_epoch(1)
    assert len(train_loader) == 2
    for images, labels in train_loader:
        assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
        assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
    val_loaders = [build_loader(val_set, info, batch_size=3, train=False, rank=rank, world_size=2) for rank in range(2)]
    assert [len(loader) for loader in val_loaders] == [2, 2]
    val_labels = [label for loader in val_loaders for _, labels in loader for label in labels.tolist()]
    assert sorted(val_labels) == [0] * 4 + [1] * 4


def test_imagefolder_distributed_train_shards_line_up(tmp_path: Path) -> None:
    write_image_folder(tmp_path, per_class=5)
    train_set, _, info = build_datasets("imagefolder", str(tmp_path), 16)
    loaders = [
        build_loader(train_set, info, batch_size=2, train=True, rank=rank, world_size=2, seed=7) for rank in range(2)
    ]
    for loader in loaders:
        loader.set_epoch(3)
    assert [len(loader) for loader in loaders] == [2, 2]
    assert all(images.shape == (2, 3, 16, 16) for loader in loaders for images, _ in loader)


@pytest.mark.parametrize("layout", ["none", "no_root", "no_val", "empty_class"])
def test_imagefolder_missing_raises_one_line(tmp_path: Path, layout: str) -> None:
    write_image_folder(tmp_path / "data", per_class=1)
    root: str | None = str(tmp_path / "data")
    expected_path = ""
    if layout == "none":
        root = None
    elif layout == "no_root":
        root = expected_path = str(tmp_path / "absent")
    elif layout == "no_val":
        shutil.rmtree(tmp_path / "data" / "val")
        expected_path = str(tmp_path / "data" / "val")
    else:
        for image in (tmp_path / "data" / "train").glob("*/*.png"):
            image.unlink()
        expected_path = str(tmp_path / "data" / "train")
    with pytest.raises(DatasetMissingError) as caught:
        build_datasets("imagefolder", root, 32)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data.root: ") and expected_path in message


def test_unknown_dataset_name_is_one_line_with_hint() -> None:
    with pytest.raises(ValueError) as caught:
        build_datasets("fashion_mnst", None, 28)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("data.name: unknown dataset 'fashion_mnst'")
    assert "allowed: fashion_mnist, digits, imagefolder" in message
    assert "did you mean 'fashion_mnist'?" in message


@pytest.mark.parametrize("subfolder", ["", "absent"])
def test_missing_fashion_root_names_the_install_command(tmp_path: Path, subfolder: str) -> None:
    root = tmp_path / subfolder
    with pytest.raises(DatasetMissingError) as caught:
        build_datasets("fashion_mnist", str(root), 28)
    message = str(caught.value)
    assert "\n" not in message and "data.root" in message and str(root) in message
    assert "apt-get install -y dataset-fashion-mnist" in message


def test_bad_idx_magic_names_the_file(tmp_path: Path) -> None:
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as file:
            file.write((1234).to_bytes(4, "big") + bytes(8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: IDX magic number 1234, expected 2051"):
        build_datasets("fashion_mnist", str(tmp_path), 28)
