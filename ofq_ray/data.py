"""Datasets and loaders: Fashion-MNIST and sklearn digits in memory, ImageNet-style folders via timm.

Two kinds of data, one front door:

* ``fashion_mnist`` and ``digits`` are held whole in memory as uint8 tensors (resized once at build
  time). Their loader, :class:`TensorLoader`, slices index batches, augments on whole batches and
  normalizes; there are no worker processes, because per-sample Python transforms are far too slow
  on a 2-core machine.
* ``imagefolder`` reads ``root/train/<class>/*`` and ``root/val/<class>/*`` with torchvision's
  ``ImageFolder`` and timm's DeiT-style transforms, behind a torch ``DataLoader``.

Example:
    >>> train_set, val_set, info = build_datasets("digits", None, 8)
    >>> loader = build_loader(train_set, info, batch_size=64, train=True)
    >>> loader.set_epoch(0)
    >>> images, labels = next(iter(loader))
    >>> tuple(images.shape), images.dtype, labels.dtype
    ((64, 1, 8, 8), torch.float32, torch.int64)
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .errors import ConfigError, DatasetError
from .hints import did_you_mean

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DEFAULT_ROOT",
    "DatasetInfo",
    "DatasetMissingError",
    "FolderLoader",
    "InMemoryImageDataset",
    "Loader",
    "TensorLoader",
    "build_datasets",
    "build_loader",
]

DATASETS = ("fashion_mnist", "digits", "imagefolder")
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "val_images": "t10k-images-idx3-ubyte.gz",
    "val_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_INSTALL_HINT = (
    "install it with `sudo apt-get install -y dataset-fashion-mnist` or set data.root to the folder "
    "holding the IDX .gz files"
)
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
FASHION_MNIST_SIZE = 28
DIGITS_SIZE = 8
DIGITS_VAL_SIZE = 300
# Zero padding for the random crop of in-memory images, in pixels of the stored size.
CROP_PADDING = 2
RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
EVAL_CROP_PCT = 0.9

# Independent random streams from one user seed, so e.g. the digits split never equals the subset draw.
_STREAM_DIGITS_SPLIT = 0
_STREAM_TRAIN_SUBSET = 1
_STREAM_VAL_SUBSET = 2
_STREAM_SHUFFLE = 3
_STREAM_AUGMENT = 4
_RESIZE_CHUNK = 2048


class DatasetMissingError(DatasetError):
    """A dataset's files are not where ``data.root`` points.

    The message is one line naming ``data.root``, the path looked at, the missing file or folder, and
    how to fix it.
    """


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a loader must know about a built dataset.

    Attributes:
        name: One of :data:`DATASETS`.
        num_classes: Number of classes; labels are ``0 .. num_classes - 1``.
        in_chans: Image channels (1 for Fashion-MNIST and digits, 3 for imagefolder).
        img_size: Side of the square images the loaders yield.
        mean: Per-channel mean used for normalization, in ``[0, 1]`` pixel units.
        std: Per-channel standard deviation used for normalization.
        train_size: Number of train examples actually used (after ``train_subset``).
        val_size: Number of validation examples actually used (after ``val_subset``).
    """

    name: str
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    val_size: int


class InMemoryImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images and labels held whole in memory.

    Args:
        images: uint8 tensor ``[N, C, S, S]`` with raw pixel values ``0..255``.
        labels: int64 tensor ``[N]``.

    Indexing gives ``(uint8 image [C, S, S], int label)``; :class:`TensorLoader` reads ``images`` and
    ``labels`` directly instead.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
            raise ValueError(f"images must be a uint8 tensor [N, C, S, S]; got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},); got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class Loader(Protocol):
    """What :func:`build_loader` returns.

    Iterating yields ``(images, labels)``: float32 ``[B, C, S, S]`` normalized with the dataset's mean
    and std, and int64 ``[B]``. ``len()`` is the number of batches this rank yields per epoch. Call
    ``set_epoch(epoch)`` before each epoch to get that epoch's deterministic order.
    """

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...


def _mixed_seed(*parts: int) -> int:
    """A 63-bit seed that differs for each distinct tuple of parts (``seed + epoch`` would collide)."""
    state = np.random.SeedSequence([part % 2**64 for part in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_mixed_seed(*parts))


def _subset_indices(total: int, subset: int | None, seed: int, stream: int, field: str) -> torch.Tensor:
    """Sorted indices of a seeded random subset of ``range(total)``; all of them when subset is None."""
    if subset is None or subset >= total:
        return torch.arange(total)
    if subset < 1:
        raise ConfigError(f"{field}: must be a positive number of examples or null; got {subset}")
    # Sorting keeps the subset in file order, so eval stays in a stable order.
    return torch.randperm(total, generator=_generator(seed, stream))[:subset].sort().values


def _validate_name(name: str) -> None:
    if name in DATASETS:
        return
    raise ConfigError(
        f"data.name: unknown dataset '{name}'; allowed: {', '.join(DATASETS)}{did_you_mean(name, DATASETS)}"
    )


def _read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Read a gzip IDX file of unsigned bytes; raises a one-line ValueError naming the file if malformed."""
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"{path}: not a readable gzip IDX file ({error})") from error
    if len(data) < 4:
        raise DatasetError(f"{path}: too short to be an IDX file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DatasetError(f"{path}: IDX magic number {magic}, expected {expected_magic}")
    # The low byte of the magic number is the number of dimensions (3 for images, 1 for labels).
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * axis : 8 + 4 * axis], "big") for axis in range(ndim))
    if len(data) != header + math.prod(dims):
        raise DatasetError(f"{path}: {len(data) - header} data bytes, header dimensions {dims} need {math.prod(dims)}")
    # A bytearray makes the array writable, so torch.from_numpy does not warn.
    return np.frombuffer(bytearray(data[header:]), dtype=np.uint8).reshape(dims)


def _load_fashion_split(root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    paths = {kind: os.path.join(root, FASHION_MNIST_FILES[f"{split}_{kind}"]) for kind in ("images", "labels")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise DatasetMissingError(
                f"data.root: Fashion-MNIST file {os.path.basename(path)} not found in {root}; "
                f"{FASHION_MNIST_INSTALL_HINT}"
            )
    images = _read_idx(paths["images"], IDX_IMAGES_MAGIC)
    labels = _read_idx(paths["labels"], IDX_LABELS_MAGIC)
    if images.shape[1:] != (FASHION_MNIST_SIZE, FASHION_MNIST_SIZE):
        raise DatasetError(f"{paths['images']}: images are {images.shape[1:]}, expected 28x28")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{paths['labels']}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.size and int(labels.max()) > 9:
        raise DatasetError(f"{paths['labels']}: label {int(labels.max())} outside 0..9")
    return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).to(torch.int64)


def _load_digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Lazy: sklearn is a dev dependency, only this dataset needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Digits pixels are 0..16; x16 maps them onto the 0..255 range (16 * 16 = 256 clips to 255).
    images = torch.from_numpy(np.clip(bunch.images * 16, 0, 255).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    order = torch.randperm(images.shape[0], generator=_generator(seed, _STREAM_DIGITS_SPLIT))
    val_index, train_index = order[:DIGITS_VAL_SIZE].sort().values, order[DIGITS_VAL_SIZE:].sort().values
    return images[train_index], labels[train_index], images[val_index], labels[val_index]


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[N, C, H, H]`` uint8 images to ``size`` once (bilinear, antialiased when shrinking)."""
    if images.shape[-1] == size:
        return images
    shrinking = size < images.shape[-1]
    chunks = []
    # Chunks bound the float copy's memory for large N or large target sizes.
    for chunk in images.split(_RESIZE_CHUNK):
        resized = F.interpolate(
            chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking
        )
        chunks.append(resized.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(chunks)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images in ``[0, 1]`` units, accumulated in float64."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in images.split(_RESIZE_CHUNK):
        values = chunk.to(torch.float64) / 255.0
        total += values.sum(dim=(0, 2, 3))
        total_sq += values.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _build_in_memory(
    name: str,
    root: str | None,
    img_size: int,
    train_subset: int | None,
    val_subset: int | None,
    seed: int,
) -> tuple[InMemoryImageDataset, InMemoryImageDataset, DatasetInfo]:
    if name == "fashion_mnist":
        root = FASHION_MNIST_DEFAULT_ROOT if root is None else root
        if not os.path.isdir(root):
            raise DatasetMissingError(
                f"data.root: Fashion-MNIST folder {root} does not exist; {FASHION_MNIST_INSTALL_HINT}"
            )
        train_images, train_labels = _load_fashion_split(root, "train")
        val_images, val_labels = _load_fashion_split(root, "val")
        num_classes = 10
    else:
        train_images, train_labels, val_images, val_labels = _load_digits(seed)
        num_classes = 10
    train_images = _resize_uint8(train_images, img_size)
    val_images = _resize_uint8(val_images, img_size)
    # Stats of the whole train split, so normalization does not depend on the subset drawn.
    mean, std = _channel_stats(train_images)
    train_index = _subset_indices(len(train_labels), train_subset, seed, _STREAM_TRAIN_SUBSET, "data.train_subset")
    val_index = _subset_indices(len(val_labels), val_subset, seed, _STREAM_VAL_SUBSET, "data.val_subset")
    train_set = InMemoryImageDataset(train_images[train_index].contiguous(), train_labels[train_index])
    val_set = InMemoryImageDataset(val_images[val_index].contiguous(), val_labels[val_index])
    info = DatasetInfo(
        name=name,
        num_classes=num_classes,
        in_chans=int(train_images.shape[1]),
        img_size=img_size,
        mean=mean,
        std=std,
        train_size=len(train_set),
        val_size=len(val_set),
    )
    return train_set, val_set, info


def _split_folder(root: str, split: str) -> str:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DatasetMissingError(
            f"data.root: imagefolder split folder {path} does not exist; "
            f"set data.root to a folder holding {split}/<class>/<image> files"
        )
    return path


def _image_folder(path: str, transform: Any) -> Any:
    # Lazy: torchvision is only needed for folder datasets.
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(path, transform=transform)
    except FileNotFoundError as error:
        message = " ".join(str(error).split())
        raise DatasetMissingError(
            f"data.root: no class folders with images in {path} ({message}); "
            "each class needs its own subfolder of image files"
        ) from error


def _build_image_folder(
    root: str | None,
    img_size: int,
    train_subset: int | None,
    val_subset: int | None,
    seed: int,
) -> tuple[Dataset[Any], Dataset[Any], DatasetInfo]:
    # Lazy: importing timm costs about 2 s, which the in-memory datasets should not pay.
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    from torch.utils.data import Subset

    if root is None:
        raise DatasetMissingError(
            "data.root: not set; imagefolder needs data.root pointing at a folder with train/ and val/ class folders"
        )
    if not os.path.isdir(root):
        raise DatasetMissingError(
            f"data.root: imagefolder root {root} does not exist; "
            "set data.root to a folder with train/<class>/ and val/<class>/ image folders"
        )
    mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    train_transform = create_transform(
        img_size,
        is_training=True,
        hflip=0.5,
        auto_augment=RAND_AUGMENT,
        interpolation="random",
        re_prob=0.25,
        re_mode="pixel",
        mean=mean,
        std=std,
    )
    eval_transform = create_transform(
        img_size, is_training=False, interpolation="bicubic", crop_pct=EVAL_CROP_PCT, mean=mean, std=std
    )
    # Both split folders are checked before the (slow) scan of either.
    train_path, val_path = _split_folder(root, "train"), _split_folder(root, "val")
    train_folder = _image_folder(train_path, train_transform)
    val_folder = _image_folder(val_path, eval_transform)
    # Labels are class-folder indices, so differing folder sets would silently mislabel validation.
    if train_folder.classes != val_folder.classes:
        only_train = sorted(set(train_folder.classes) - set(val_folder.classes))
        only_val = sorted(set(val_folder.classes) - set(train_folder.classes))
        raise DatasetError(
            f"data.root: class folders of {root}/train and {root}/val differ "
            f"(only in train: {only_train[:5]}, only in val: {only_val[:5]})"
        )
    train_index = _subset_indices(len(train_folder), train_subset, seed, _STREAM_TRAIN_SUBSET, "data.train_subset")
    val_index = _subset_indices(len(val_folder), val_subset, seed, _STREAM_VAL_SUBSET, "data.val_subset")
    train_set: Dataset[Any] = train_folder if train_subset is None else Subset(train_folder, train_index.tolist())
    val_set: Dataset[Any] = val_folder if val_subset is None else Subset(val_folder, val_index.tolist())
    info = DatasetInfo(
        name="imagefolder",
        num_classes=len(train_folder.classes),
        in_chans=3,
        img_size=img_size,
        mean=mean,
        std=std,
        train_size=len(train_index),
        val_size=len(val_index),
    )
    return train_set, val_set, info


def build_datasets(
    name: str,
    root: str | None,
    img_size: int,
    *,
    train_subset: int | None = None,
    val_subset: int | None = None,
    seed: int = 0,
) -> tuple[Dataset[Any], Dataset[Any], DatasetInfo]:
    """Build the train and validation datasets for ``name``.

    Args:
        name: One of :data:`DATASETS`. An unknown name raises a one-line ``ValueError`` with a
            "did you mean" hint.
        root: Data folder. For ``fashion_mnist`` the folder with the four IDX ``.gz`` files (None means
            :data:`FASHION_MNIST_DEFAULT_ROOT`); ignored for ``digits``; required for ``imagefolder``
            (``root/train/<class>/*`` and ``root/val/<class>/*``).
        img_size: Side of the square images the loaders yield. In-memory datasets are resized once here
            (bilinear, antialiased when shrinking) and stored as uint8; imagefolder crops to it.
        train_subset: Use only this many train examples, drawn deterministically from ``seed``. None,
            or a number at least the split size, uses the whole split.
        val_subset: The same for the validation split.
        seed: Seeds the subsets and the digits train/val split (1497/300).

    Returns:
        ``(train_set, val_set, info)``. ``val`` is the official test split for Fashion-MNIST. The
        in-memory datasets are :class:`InMemoryImageDataset`; their ``info.mean``/``info.std`` are
        measured on the whole (resized) train split.

    Raises:
        DatasetMissingError: The files are not under ``root``.
        ValueError: Unknown name, a non-positive subset, or a malformed file.
    """
    _validate_name(name)
    if img_size < 1:
        raise ConfigError(f"data.img_size: must be a positive number of pixels; got {img_size}")
    if name == "imagefolder":
        return _build_image_folder(root, img_size, train_subset, val_subset, seed)
    return _build_in_memory(name, root, img_size, train_subset, val_subset, seed)


def _check_shard(rank: int, world_size: int, batch_size: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"batch_size: must be positive; got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")


class TensorLoader:
    """Batches of an :class:`InMemoryImageDataset`, sharded across ranks, augmented on whole batches.

    Train (``train=True``): each epoch every rank draws the same seeded permutation, takes the strided
    shard ``perm[rank::world_size]``, truncates it to the smallest rank's shard and drops the partial
    last batch, so all ranks yield the same number of batches. With ``augment`` each batch gets a random
    crop after zero padding of :data:`CROP_PADDING` pixels and a horizontal flip with p=0.5, drawn
    per sample from a generator seeded by ``(seed, epoch, rank)``.

    Eval (``train=False``): file order, no augmentation, shard ``rank::world_size``, last partial batch
    kept, so the ranks together see every example exactly once.

    Iterating twice in the same epoch yields the same batches.
    """

    def __init__(
        self,
        dataset: InMemoryImageDataset,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        _check_shard(rank, world_size, batch_size)
        channels = dataset.images.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {channels}-channel images")
        self.dataset = dataset
        self.batch_size = batch_size
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.augment = augment and train
        self.epoch = 0
        # (x / 255 - mean) / std folded into one multiply-add.
        std_tensor = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std_tensor)
        self._shift = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_tensor
        if train and len(self) == 0:
            raise ConfigError(
                f"batch_size: {batch_size} is larger than the per-rank train shard "
                f"({len(dataset) // world_size} examples); no train step would run"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and augmentation the next iteration uses."""
        self.epoch = epoch

    def _per_rank_train_examples(self) -> int:
        return (len(self.dataset) // self.world_size) // self.batch_size * self.batch_size

    def __len__(self) -> int:
        if self.train:
            return self._per_rank_train_examples() // self.batch_size
        return math.ceil(len(range(self.rank, len(self.dataset), self.world_size)) / self.batch_size)

    def epoch_indices(self) -> torch.Tensor:
        """Dataset indices this rank yields in the current epoch, in order."""
        total = len(self.dataset)
        if not self.train:
            return torch.arange(self.rank, total, self.world_size)
        order = torch.randperm(total, generator=_generator(self.seed, self.epoch, _STREAM_SHUFFLE))
        return order[self.rank :: self.world_size][: self._per_rank_train_examples()]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        augment_generator = _generator(self.seed, self.epoch, self.rank, _STREAM_AUGMENT)
        for batch_index in self.epoch_indices().split(self.batch_size):
            images = self.dataset.images[batch_index]
            if self.augment:
                images = _random_crop_flip(images, CROP_PADDING, augment_generator)
            yield images.float() * self._scale - self._shift, self.dataset.labels[batch_index]


def _random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding) and horizontal flip of ``[B, C, S, S]`` without a Python loop.

    Both are one gather: each sample's rows and columns are index ranges into the padded batch, with the
    column range reversed for flipped samples.
    """
    batch, channels, size, _ = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    offset_y = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator)
    offset_x = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator)
    flip = torch.rand(batch, 1, generator=generator) < 0.5
    steps = torch.arange(size).unsqueeze(0)
    rows = offset_y + steps
    cols = offset_x + torch.where(flip, size - 1 - steps, steps)
    return padded[
        torch.arange(batch).view(batch, 1, 1, 1),
        torch.arange(channels).view(1, channels, 1, 1),
        rows.view(batch, 1, size, 1),
        cols.view(batch, 1, 1, size),
    ]


class FolderLoader:
    """A torch ``DataLoader`` over an imagefolder dataset, with ``set_epoch`` and ``len``.

    Train: ``DistributedSampler(shuffle=True, drop_last=True)`` when ``world_size > 1``, else a
    ``RandomSampler`` reseeded from ``(seed, epoch)``; the partial last batch is dropped. Eval: the
    strided shard ``rank::world_size`` in file order, last partial batch kept, so every example is
    seen exactly once across ranks (``DistributedSampler`` would pad with repeats).
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        batch_size: int,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

        _check_shard(rank, world_size, batch_size)
        self.seed = seed
        self.rank = rank
        self._random_sampler_generator: torch.Generator | None = None
        # DataLoader draws worker seeds from this generator, so worker augmentation follows (seed, epoch).
        self._loader_generator = _generator(seed, 0, rank, _STREAM_AUGMENT)
        sampler: Iterable[int]
        if not isinstance(dataset, Sized):
            raise TypeError(f"dataset: {type(dataset).__name__} has no len(); FolderLoader needs a map-style dataset")
        total = len(dataset)
        if train and world_size > 1:
            sampler = DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
            )
        elif train:
            self._random_sampler_generator = _generator(seed, 0, _STREAM_SHUFFLE)
            sampler = RandomSampler(dataset, generator=self._random_sampler_generator)
        else:
            sampler = range(rank, total, world_size)
        self.sampler = sampler
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=torch.cuda.is_available(),
            drop_last=train,
            persistent_workers=num_workers > 0,
            generator=self._loader_generator,
        )
        if train and len(self.loader) == 0:
            raise ConfigError(
                f"batch_size: {batch_size} is larger than the per-rank train shard "
                f"({total // world_size} examples); no train step would run"
            )

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle deterministically for ``epoch`` (no effect on eval order)."""
        set_sampler_epoch = getattr(self.sampler, "set_epoch", None)
        if set_sampler_epoch is not None:
            set_sampler_epoch(epoch)
        if self._random_sampler_generator is not None:
            self._random_sampler_generator.manual_seed(_mixed_seed(self.seed, epoch, _STREAM_SHUFFLE))
        self._loader_generator.manual_seed(_mixed_seed(self.seed, epoch, self.rank, _STREAM_AUGMENT))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.loader)


def build_loader(
    dataset: Dataset[Any],
    info: DatasetInfo,
    *,
    batch_size: int,
    train: bool,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    augment: bool = True,
    num_workers: int = 0,
) -> Loader:
    """Build the loader for a dataset from :func:`build_datasets`.

    Args:
        dataset: The train or val set returned by :func:`build_datasets`.
        info: Its :class:`DatasetInfo`; in-memory batches are normalized with ``info.mean``/``info.std``.
        batch_size: Examples per batch on this rank.
        train: Shuffle, augment and give every rank the same number of full batches (for DDP). When
            False: file order, no augmentation, every example exactly once across ranks.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of data-parallel processes.
        seed: Seeds the per-epoch shuffle and augmentation; the same ``(seed, epoch)`` reproduces them.
        augment: In-memory datasets only: random crop (2-pixel zero padding) and horizontal flip on
            train batches. Imagefolder train always uses its timm transforms.
        num_workers: DataLoader workers for imagefolder; ignored for in-memory datasets, which never
            use worker processes.

    Returns:
        A :class:`Loader`; call ``set_epoch(epoch)`` before each epoch.

    Raises:
        ValueError: A bad rank/world_size/batch_size, or a train shard with no full batch.
    """
    if isinstance(dataset, InMemoryImageDataset):
        return TensorLoader(
            dataset,
            info.mean,
            info.std,
            batch_size=batch_size,
            train=train,
            rank=rank,
            world_size=world_size,
            seed=seed,
            augment=augment,
        )
    return FolderLoader(
        dataset,
        batch_size=batch_size,
        train=train,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=num_workers,
    )
