"""Training and test images available offline, split by image (never by patch), and the
simulator that turns them into training pairs.

Two sources:

- ``skimage``: the sample images shipped with scikit-image (photographs, textures, microscopy,
  astronomy), as grey levels in ``[0, 1]``. Training draws random patches (with flips and 90 degree
  rotations) from the training images; the test set is a fixed set of patches from *other*
  images (``TEST_IMAGES``), so no test pixel was ever seen in training.
- ``fashion-mnist``: Debian's ``dataset-fashion-mnist`` (70,000 28x28 images, IDX files under
  ``/usr/share/datasets/fashion-mnist``; ``setup.sh`` in this folder installs it). Training uses
  the 60,000 training images, the test set the 10,000 others.

:func:`simulate` is the ``[data] source`` of the configs: each call draws fresh high-resolution
images (augmented patches or whole images), their low-resolution inputs ``y = D x`` (the box
operator of :mod:`.degradation`) and uniform dequantisation noise of one grey level on ``x`` (the
images are 8-bit), all from the trainer's seeded generator. :func:`held_out_images` is the fixed
held-out set (validation during training, :mod:`.evaluate` after).
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .degradation import check_factor, downsample

__all__ = [
    "TRAIN_IMAGES", "TEST_IMAGES", "FASHION_MNIST_DIR", "SOURCES", "load_skimage", "random_patches", "PatchSampler",
    "fixed_patches", "read_idx", "load_fashion_mnist", "pad_to_multiple", "check_arguments", "draw_images",
    "simulate", "held_out_images",
]

#: scikit-image sample images used for training (all load offline with scikit-image 0.21+).
TRAIN_IMAGES = (
    "brick", "grass", "gravel", "moon", "clock", "page", "text", "cell", "cat", "chelsea",
    "hubble_deep_field", "immunohistochemistry", "retina", "rocket", "coffee",
)
#: held-out images: test patches come only from these.
TEST_IMAGES = ("camera", "astronaut", "coins")

FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

#: the data sets :func:`simulate` draws from
SOURCES = ("skimage", "fashion-mnist")


def load_skimage(names: Sequence[str]) -> list[Tensor]:
    """Load scikit-image sample images by name as grey-level tensors ``(1, H, W)`` in ``[0, 1]``
    (float32; colour images converted with ``skimage.color.rgb2gray``).

    >>> [tuple(t.shape) for t in load_skimage(["camera"])]
    [(1, 512, 512)]
    """
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.util import img_as_float

    images = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"unknown scikit-image sample image {name!r}")
        a = img_as_float(loader())
        if a.ndim == 3:
            a = rgb2gray(a[..., :3])
        images.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None])
    return images


def _check_patch_size(images: Sequence[Tensor], size: int) -> None:
    if size < 1:
        raise ValueError(f"the patch size must be positive, got {size}")
    small = [tuple(t.shape[1:]) for t in images if min(t.shape[1:]) < size]
    if small:
        raise ValueError(f"patch size {size} is larger than image(s) of size {small}")


def random_patches(images: Sequence[Tensor], size: int, n: int, generator: torch.Generator,
                   weights: Optional[Tensor] = None) -> Tensor:
    """``n`` random ``size x size`` patches ``(n, C, size, size)`` of ``(C, H, W)`` images, each
    from an image drawn with probability ``weights`` (default: proportional to its area), at a
    random corner, rotated by a random multiple of 90 degrees and flipped with probability 1/2;
    every random number comes from ``generator``.

    >>> random_patches([torch.rand(1, 40, 50)], 16, 3, torch.Generator().manual_seed(0)).shape
    torch.Size([3, 1, 16, 16])
    """
    _check_patch_size(images, size)
    if weights is None:
        areas = torch.tensor([float(t.shape[1] * t.shape[2]) for t in images])
        weights = areas / areas.sum()
    g = generator
    which = torch.multinomial(weights, n, replacement=True, generator=g).tolist()
    out = []
    for i in which:
        img = images[i]
        top = int(torch.randint(img.shape[1] - size + 1, (1,), generator=g))
        left = int(torch.randint(img.shape[2] - size + 1, (1,), generator=g))
        p = img[:, top:top + size, left:left + size]
        k, flip = torch.randint(4, (1,), generator=g).item(), torch.randint(2, (1,), generator=g).item()
        p = torch.rot90(p, int(k), dims=(1, 2))
        out.append(torch.flip(p, dims=(2,)) if flip else p)
    return torch.stack(out)


class PatchSampler:
    """Random ``size x size`` patches from a list of ``(C, H, W)`` images, augmented with flips and
    90 degree rotations; each patch comes from an image chosen with probability proportional to its
    area.

    >>> sampler = PatchSampler([torch.rand(1, 40, 50)], 16, seed=0)
    >>> sampler.sample(3).shape
    torch.Size([3, 1, 16, 16])
    """

    def __init__(self, images: Sequence[Tensor], size: int, seed: int = 0) -> None:
        if not images:
            raise ValueError("PatchSampler needs at least one image")
        _check_patch_size(images, size)
        self.images = list(images)
        self.size = size
        self.generator = torch.Generator().manual_seed(seed)
        areas = torch.tensor([float(t.shape[1] * t.shape[2]) for t in self.images])
        self.weights = areas / areas.sum()

    def sample(self, batch: int) -> Tensor:
        """A batch ``(batch, C, size, size)`` of random augmented patches."""
        return random_patches(self.images, self.size, batch, self.generator, self.weights)


def fixed_patches(images: Sequence[Tensor], size: int, per_image: int, seed: int = 1) -> Tensor:
    """A reproducible test set: ``per_image`` random patches from each image (no augmentation).

    >>> fixed_patches([torch.rand(1, 40, 50)], 16, per_image=4).shape
    torch.Size([4, 1, 16, 16])
    """
    _check_patch_size(images, size)
    g = torch.Generator().manual_seed(seed)
    out = []
    for img in images:
        for _ in range(per_image):
            top = int(torch.randint(img.shape[1] - size + 1, (1,), generator=g))
            left = int(torch.randint(img.shape[2] - size + 1, (1,), generator=g))
            out.append(img[:, top:top + size, left:left + size])
    return torch.stack(out)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format: magic ``0x0000TTDD``, big-endian sizes, raw data),
    gzipped or not, as a numpy array. Only unsigned-byte data (type ``0x08``) is supported.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "tiny-idx3-ubyte")
    >>> with open(path, "wb") as f:
    ...     _ = f.write(struct.pack(">IIII", 0x0803, 1, 2, 2) + bytes([0, 1, 2, 3]))
    >>> read_idx(path).tolist()
    [[[0, 1], [2, 3]]]
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path} is too short to be an IDX file")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: expected an unsigned-byte IDX file (magic 0x0000 08 DD), got {raw[:4].hex()}")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} = {int(np.prod(dims))} values, file holds {data.size}")
    return data.reshape(dims)


def load_fashion_mnist(split: str = "train", root: Optional[str | Path] = None, limit: Optional[int] = None) -> Tensor:
    """Fashion-MNIST images ``(N, 1, 28, 28)`` in ``[0, 1]`` from Debian's ``dataset-fashion-mnist``.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 other images).
        root: folder with the IDX files (default ``$FASHION_MNIST_DIR`` or
            ``/usr/share/datasets/fashion-mnist``).
        limit: keep only the first ``limit`` images.

    Raises ``FileNotFoundError`` (saying how to install the package) when the files are missing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    stem = "train" if split == "train" else "t10k"
    candidates = [root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-images-idx3-ubyte"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root}; install it with "
            "`apt-get install dataset-fashion-mnist` (or run applications/super_resolution/setup.sh)"
        )
    a = read_idx(path)
    if limit is not None:
        a = a[:limit]
    return torch.from_numpy(a.astype(np.float32) / 255.0)[:, None]


def pad_to_multiple(x: Tensor, m: int) -> Tensor:
    """Zero-pad the last two axes of ``x`` (evenly on both sides) to multiples of ``m``.

    >>> pad_to_multiple(torch.ones(1, 1, 28, 28), 8).shape
    torch.Size([1, 1, 32, 32])
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    return torch.nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]) if (ph or pw) else x


def check_arguments(source: str = "skimage", factor: int = 4, patch: int = 32, limit: int = 0) -> None:
    """Raise ``ValueError`` for arguments :func:`simulate` cannot use (before anything is read)."""
    if source not in SOURCES:
        raise ValueError(f"[data] arguments source must be one of {list(SOURCES)}, got {source!r}")
    check_factor(factor)
    if not isinstance(patch, int) or patch < 1:
        raise ValueError(f"[data] arguments patch must be a positive integer, got {patch!r}")
    if source == "skimage" and patch % factor:
        raise ValueError(f"the scale factor {factor} must divide the patch size {patch}")
    if not isinstance(limit, int) or limit < 0:
        raise ValueError(f"[data] arguments limit must be a non-negative integer (0: all images), got {limit!r}")


@functools.lru_cache(maxsize=4)
def _training_set(source: str, factor: int, limit: int) -> tuple[Tensor, ...] | Tensor:
    """The training images, read once per process: the scikit-image list, or the Fashion-MNIST
    training images padded to a multiple of ``factor``."""
    if source == "skimage":
        return tuple(load_skimage(TRAIN_IMAGES))
    return pad_to_multiple(load_fashion_mnist("train", limit=limit or None), factor)


def draw_images(n: int, generator: torch.Generator, source: str = "skimage", factor: int = 4, patch: int = 32,
                limit: int = 0) -> Tensor:
    """``n`` random high-resolution training images ``(n, 1, H, W)`` in ``[0, 1]`` (float32):
    augmented ``patch x patch`` patches of the scikit-image training images, or Fashion-MNIST
    training images (padded to a multiple of ``factor``, mirrored with probability 1/2; ``limit``:
    only the first ``limit``), drawn with ``generator``."""
    check_arguments(source, factor, patch, limit)
    images = _training_set(source, factor, limit)
    if source == "skimage":
        return random_patches(images, patch, n, generator)
    idx = torch.randint(images.shape[0], (n,), generator=generator)
    x = images[idx]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def simulate(n: int, generator: torch.Generator, source: str = "skimage", factor: int = 4, patch: int = 32,
             limit: int = 0) -> tuple[Tensor, Tensor]:
    r"""``n`` training pairs ``(x + u, D x)``: high-resolution images :math:`x` from
    :func:`draw_images`, dequantised by :math:`u \sim \mathcal U(-\tfrac{1}{512}, \tfrac{1}{512})`
    per pixel (the likelihood of 8-bit data as a density), and their low-resolution inputs
    :math:`y = Dx` (box average over ``factor x factor`` blocks). The simulator of
    ``[data] source = "applications.super_resolution.data:simulate"``; its keyword arguments are
    the config's ``[data] arguments``.

    >>> x, y = simulate(2, torch.Generator().manual_seed(0), patch=16)
    >>> tuple(x.shape), tuple(y.shape), float((x - torch.nn.functional.interpolate(y, scale_factor=4)).abs().max()) < 1
    ((2, 1, 16, 16), (2, 1, 4, 4), True)
    """
    x = draw_images(n, generator, source, factor, patch, limit)
    u = torch.rand(x.shape, generator=generator)
    return x + (u - 0.5) / 256.0, downsample(x, factor)


def held_out_images(source: str = "skimage", factor: int = 4, patch: int = 32, limit: int = 0, per_image: int = 64,
                seed: int = 1) -> Tensor:
    """The fixed held-out high-resolution images ``(N, 1, H, W)`` (never drawn in training):
    ``per_image`` patches of each of :data:`TEST_IMAGES` (``fixed_patches`` with ``seed``), or the
    Fashion-MNIST test images (the first ``limit``, default 1024; padded like the training ones).
    Takes the same arguments as :func:`simulate` (the published results use the defaults)."""
    check_arguments(source, factor, patch, limit)
    if source == "skimage":
        return fixed_patches(load_skimage(TEST_IMAGES), patch, per_image, seed=seed)
    return pad_to_multiple(load_fashion_mnist("test", limit=limit or 1024), factor)
