"""Datasets and loaders of ``fastvit-train``: scikit-learn's bundled digits, or an ImageFolder tree
(``DIR/train/<class>/*``, ``DIR/val/<class>/*``) through torchvision with timm's transforms.

Data order and augmentation are functions of (seed, epoch, sample index) only, so a run resumed at
any step boundary sees the same batches and the same augmented images as an uninterrupted one,
whatever the number of DataLoader workers.
"""

from __future__ import annotations

import math
import os
import random
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset that cannot be used: the message names the path and what was expected."""


@dataclass
class Data:
    train: Dataset
    val: Dataset
    classes: list[str]
    in_chans: int
    img_size: int
    skipped: int = 0  # files left out (not images, unreadable)


# ------------------------------------------------------------------------------------------------
# the built-in default: scikit-learn's handwritten digits (1,797 8x8 images, no download)
# ------------------------------------------------------------------------------------------------


class TensorImages(Dataset):
    """Images (N, C, H, W) in [0, 1] and labels (N,): normalised to [-1, 1], resized to ``img_size``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, img_size: int):
        if images.shape[-1] != img_size or images.shape[-2] != img_size:
            images = torch.nn.functional.interpolate(images, size=(img_size, img_size), mode="bilinear",
                                                     align_corners=False, antialias=True)
        self.images = (images - 0.5) / 0.5
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def digits(img_size: int, seed: int = 0, val_fraction: float = 0.2) -> Data:
    """scikit-learn's digits as one-channel images, split 80/20 per class with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise DataError("the built-in digits dataset needs scikit-learn: pip install 'fastvit-kernels[train]', "
                        "or pass --data DIR") from e
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    tr, va = train_test_split(np.arange(len(labels)), test_size=val_fraction, random_state=seed,
                              stratify=bunch.target)
    tr, va = torch.as_tensor(tr), torch.as_tensor(va)
    return Data(TensorImages(images[tr], labels[tr], img_size), TensorImages(images[va], labels[va], img_size),
                [str(c) for c in range(10)], in_chans=1, img_size=img_size)


# ------------------------------------------------------------------------------------------------
# an ImageFolder tree
# ------------------------------------------------------------------------------------------------


def _readable_image(path: str) -> str | None:
    """None when ``path`` opens as an image (header read), else why not."""
    from PIL import Image

    if not path.lower().endswith(IMAGE_EXTENSIONS):
        return "not an image file extension"
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018  (reads the header)
    except Exception as e:  # PIL raises several types for a bad file
        return f"{type(e).__name__}: {e}"
    return None


class _Folder:
    """torchvision's ImageFolder over one split, with the files that are not readable images left
    out (counted, one warning naming them) and an empty class folder an error naming its path."""

    def __init__(self, root: Path, split: str, transform, classes: list[str] | None):
        from torchvision.datasets import ImageFolder

        path = root / split
        if not path.is_dir():
            raise DataError(f"--data {root}: no {split}/ folder ({path}); expected {root}/{split}/<class>/<images>")
        found = sorted(d.name for d in path.iterdir() if d.is_dir())
        if not found:
            raise DataError(f"--data {root}: {path} has no class folders; expected {path}/<class>/<images>")
        if classes is not None and found != classes:
            raise DataError(f"--data {root}: the classes of {path} ({found}) differ from train/'s ({classes})")
        reasons: dict[str, str | None] = {}
        for c in found:
            files = sorted(str(f) for f in (path / c).rglob("*") if f.is_file())
            reasons.update((f, _readable_image(f)) for f in files)
            if not any(reasons[f] is None for f in files):
                raise DataError(f"--data {root}: the class folder {path / c} has no readable images "
                                f"({len(files)} files)")
        self.skipped = [(f, why) for f, why in reasons.items() if why is not None]

        def valid(p: str) -> bool:
            why = reasons[p] if p in reasons else _readable_image(p)
            return why is None

        self.dataset = ImageFolder(str(path), transform=transform, is_valid_file=valid)
        if self.skipped:
            shown = "; ".join(f"{p} ({why})" for p, why in self.skipped[:5])
            more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            warnings.warn(f"{path}: skipped {len(self.skipped)} files that are not readable images: {shown}{more}",
                          stacklevel=3)


class _SafeLoad(Dataset):
    """A sample whose file fails to decode (truncated after a valid header) is replaced by the next
    one, with a warning naming it: a bad file does not stop a run."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        for k in range(len(self.dataset)):
            j = (i + k) % len(self.dataset)
            try:
                return self.dataset[j]
            except OSError as e:
                warnings.warn(f"skipping {self.dataset.samples[j][0]}: {e}", stacklevel=2)
        raise DataError("no file of the dataset could be read")


def image_folder(root: str | os.PathLike, img_size: int, *, auto_augment: str | None, re_prob: float,
                 interpolation: str = "bicubic") -> Data:
    """``root/train`` and ``root/val`` as RGB images resized to ``img_size``: timm's training
    transform (random resized crop, flip, RandAugment, random erasing) and its eval transform."""
    from timm.data import create_transform

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--data {root}: no such directory")
    train_tf = create_transform(img_size, is_training=True, auto_augment=auto_augment, re_prob=re_prob,
                                interpolation=interpolation)
    val_tf = create_transform(img_size, is_training=False, interpolation=interpolation)
    train = _Folder(root, "train", train_tf, None)
    classes = train.dataset.classes
    val = _Folder(root, "val", val_tf, classes)
    return Data(_SafeLoad(train.dataset), _SafeLoad(val.dataset), list(classes), in_chans=3, img_size=img_size,
                skipped=len(train.skipped) + len(val.skipped))


# ------------------------------------------------------------------------------------------------
# order and randomness as functions of (seed, epoch, index)
# ------------------------------------------------------------------------------------------------


class SeededSamples(Dataset):
    """Each sample drawn with the random state seeded from (seed, epoch, index): augmentation does
    not depend on which worker loads it, nor on what was loaded before."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        s = zlib.crc32(f"{self.seed}/{self.epoch}/{i}".encode())
        py, npy = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            random.seed(s)
            np.random.seed(s)
            try:
                return self.dataset[i]
            finally:
                random.setstate(py)
                np.random.set_state(npy)


class MaskedPadding(Dataset):
    """Index i < n: (x, y, 1); n <= i: sample i - n as (x, y, 0), a repeat that evaluation masks out
    (every rank then runs the same number of batches, and no sample counts twice)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        n = len(self.dataset)
        x, y = self.dataset[i % n]
        return x, y, int(i < n)


class ShardedOrder(Sampler[int]):
    """A seeded permutation per epoch (or the identity), split over ``world_size`` ranks the way
    DistributedSampler does (rank r takes every world_size-th index, so each global batch holds the
    same samples for any world size), starting after ``start`` of this rank's samples (resume)."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, pad_past_end: bool = False):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world_size
        self.drop_last, self.pad_past_end = drop_last, pad_past_end
        self.epoch, self.start = 0, 0
        self.per_rank = n // world_size if drop_last else math.ceil(n / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world
        if self.drop_last:
            order = order[:total]
        elif self.pad_past_end:  # indices >= n: MaskedPadding serves them as masked repeats
            order = order + list(range(self.n, total))
        else:
            order = order + order[: total - self.n]
        return order[self.rank:total:self.world]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


def loader(dataset: Dataset, sampler: ShardedOrder, batch_size: int, workers: int, pin_memory: bool,
           drop_last: bool) -> DataLoader:
    # the loader's own seed draws come from a private generator, not the global RNG (dropout, Mixup),
    # so creating a loader mid-epoch on resume leaves the global random stream where it was
    gen = torch.Generator().manual_seed(sampler.seed * 7919 + sampler.epoch)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, generator=gen,
                      pin_memory=pin_memory, drop_last=drop_last, persistent_workers=False)
