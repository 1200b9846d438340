"""Real image-dataset loaders: scikit-learn digits, MNIST-format IDX folders, Omniglot-style PNG
folders, generic ``.npz`` files and ImageFolder trees (``root/<class>/*.png|jpg|jpeg``).

Nothing downloads here (the machines have no network): a missing or malformed dataset is a
:class:`DatasetError` that says what is wrong and how to get or fix the data, never a silent
fallback to some other data.

Why not torchvision's readers: its IDX reader (``read_sn3_pascalvincent_tensor``) opens the file
as is, so it cannot read Debian's gzipped Fashion-MNIST, and it checks the header with
``assert`` (a bare AssertionError, gone under ``python -O``); its ImageFolder neither sees gray
against RGB nor composites transparency, and PIL's errors surface per sample, mid-training.
And the torchvision wheels the package registries hold here are CUDA builds that do not load
beside the CPU build of torch 2.13.0 (``operator torchvision::nms does not exist``).
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conf.choices import DatasetName

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_IMAGEFOLDER_SIZE",
    "FASHION_MNIST_DIR",
    "IMAGEFOLDER_EXTENSIONS",
    "DatasetError",
    "ImageDataset",
    "clear_dataset_cache",
    "decode_pixels",
    "encode_pixels",
    "load_dataset",
    "pixel_encoding",
    "read_idx",
]

DATASET_NAMES: tuple[str, ...] = tuple(DatasetName)

#: Where Debian's ``dataset-fashion-mnist`` package puts the (gzipped) IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

#: The four MNIST-format files, in load order; each may also be present as ``<name>.gz``.
IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))

DEFAULT_OMNIGLOT_SIZE = 28

#: Side of an ImageFolder's images when no image_size is given: 28 for gray data (the Omniglot and
#: MNIST convention), 32 for colour data (CIFAR-FS, the emoji folder of scripts/datasets/).
DEFAULT_IMAGEFOLDER_SIZE: dict[str, int] = {"L": 28, "RGB": 32}
#: The image files an ImageFolder class folder may hold (case-insensitive).
IMAGEFOLDER_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")

_log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A missing or malformed dataset; the message says what is wrong and how to fix it."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A whole labelled image dataset, read-only so a cached copy can be shared safely.

    ``eq=False``: identity equality and hashing, so a dataset can key a cache (element-wise
    array comparison would make ``==`` ambiguous anyway).
    """

    name: str
    images: np.ndarray  # float32, shape (N, C, H, W), values in [0, 1]
    labels: np.ndarray  # int64, shape (N,), global class ids 0..num_classes-1 (contiguous)
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Size of the class-id space (a class may still have few or no samples)."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image, for sizing the network input."""
        _, c, h, w = self.images.shape
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_dataset(
    name: str, path: str | os.PathLike[str] | None = None, image_size: int | None = None
) -> ImageDataset:
    """Load dataset ``name`` ('digits', 'fashion_mnist', 'mnist', 'omniglot', 'npz' or
    'imagefolder').

    ``path`` is the folder (IDX, Omniglot, ImageFolder) or file (npz); digits takes none,
    fashion_mnist defaults to the Debian package folder. ``image_size`` resizes to a square of that
    side (Omniglot defaults to 28, ImageFolder to 28 for gray and 32 for colour data; the others
    keep their native size when it is None).

    Results are cached per process by (name, path, image_size) because every simulated client in a
    Ray worker asks for the same data; the returned arrays are read-only so no caller can change
    the cached copy for the others.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; valid names are: {', '.join(DATASET_NAMES)}")
    if image_size is not None:
        if (
            isinstance(image_size, bool)
            or not isinstance(image_size, int | np.integer)
            or image_size < 1
        ):
            raise DatasetError(f"image_size must be a positive integer or None, got {image_size!r}")
        image_size = int(image_size)
    if key == "omniglot" and image_size is None:
        image_size = DEFAULT_OMNIGLOT_SIZE
    return _load_cached(key, _resolve_path(key, path), image_size)


def clear_dataset_cache() -> None:
    """Forget cached datasets (frees memory; the next load re-reads the files)."""
    _load_cached.cache_clear()


#: float32(1/255): the IDX and uint8-npz loaders multiply by it (not the same as dividing by 255
#: in float32 for 126 of the 256 pixel values).
_BY_255 = float(np.float32(1.0 / 255.0))


def pixel_encoding(name: str, channels: int, image_size: int | None = None) -> dict[str, object]:
    """How the loader of dataset ``name`` turns an image file's 8-bit pixels into the model's
    input values, for a node that classifies image files without this project (an ONNX model's
    metadata, docs/edge.md).

    Keys: ``mode`` (Pillow's ``"L"`` or ``"RGB"``), ``op`` and ``by`` (``"divide"`` or
    ``"multiply"`` the pixels, as float32, by ``by`` in float32), ``invert`` (then ``1 - value``),
    ``resize`` (what the loader does to an image of another size: ``"lanczos"``, Pillow's Lanczos
    on the 8-bit image before the scaling; ``"none"``, the data has the model's size; or
    ``"bilinear-antialias"``, PyTorch's resize of the loaded values, which no 8-bit file
    reproduces exactly), and ``text``, all of it in words. Values are laid out (1, C, H, W).
    """
    key = DatasetName(str(name).strip().lower().replace("-", "_"))
    mode = "L" if channels == 1 else "RGB"
    resize = "none" if image_size is None else "bilinear-antialias"
    op, by, invert = "multiply", _BY_255, False
    source = "8-bit pixels p (0..255)"
    if key is DatasetName.digits:
        op, by = "divide", 16.0
        source = "8-bit pixels p holding scikit-learn digits' levels (0..16)"
    elif key is DatasetName.omniglot:
        op, by, invert, resize = "divide", 255.0, True, "lanczos"
    elif key is DatasetName.imagefolder:
        op, by, resize = "divide", 255.0, "lanczos"
    formula = "p * float32(1/255)" if op == "multiply" else f"p / {by:g}"
    text = (
        f"{'gray' if mode == 'L' else 'RGB'} {source} -> "
        f"{'1 - ' + formula if invert else formula} in float32, laid out (1, C, H, W)"
    )
    if resize == "lanczos":
        text += "; an image of another size is first resized with Pillow's Lanczos filter"
    elif resize == "bilinear-antialias":
        text += "; the run resized its data (PyTorch, bilinear, antialiased) after scaling"
    if key is DatasetName.imagefolder:
        text += "; transparent pixels are composited onto white, EXIF orientation applied"
    return {"mode": mode, "op": op, "by": by, "invert": invert, "resize": resize, "text": text}


def decode_pixels(pixels: np.ndarray, encoding: dict[str, object]) -> np.ndarray:
    """An image's 8-bit pixels (H, W) or (H, W, C) as the model's input (1, C, H, W), by
    :func:`pixel_encoding` (what docs/edge.md's script does with numpy alone)."""
    values = np.asarray(pixels, dtype=np.float32)
    by = np.float32(encoding["by"])
    values = values * by if encoding["op"] == "multiply" else values / by
    if encoding["invert"]:
        values = np.float32(1.0) - values
    return values.reshape(values.shape[0], values.shape[1], -1).transpose(2, 0, 1)[None]


def encode_pixels(values: np.ndarray, encoding: dict[str, object]) -> np.ndarray:
    """The 8-bit pixels (H, W) or (H, W, 3) that :func:`decode_pixels` maps back to exactly
    ``values`` (C, H, W), the loader's values of an image; a :class:`DatasetError` when there are
    none (the run resized its data, or an npz held other floats)."""
    values = np.asarray(values, dtype=np.float32)
    level = np.float32(1.0) - values if encoding["invert"] else values
    by = np.float32(encoding["by"])
    level = level / by if encoding["op"] == "multiply" else level * by
    pixels = np.clip(np.rint(level), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels
    if not np.array_equal(decode_pixels(pixels, encoding)[0], values):
        raise DatasetError(
            "these input values have no exact 8-bit image form under the dataset's encoding "
            f"({encoding['text']})"
        )
    return pixels


def _resolve_path(key: str, path: str | os.PathLike[str] | None) -> str | None:
    """Apply the per-dataset default and normalise the path so the cache key is stable."""
    if key == "digits":
        if path is not None:
            raise DatasetError(
                "dataset 'digits' is bundled with scikit-learn and takes no path; "
                f"got path={str(path)!r} (set the dataset path to null)"
            )
        return None
    if path is None or str(path) == "":
        if key == "fashion_mnist":
            path = FASHION_MNIST_DIR
        elif key == "mnist":
            raise DatasetError(
                "dataset 'mnist' needs a path: no Debian package ships MNIST, so put the four "
                f"MNIST files ({', '.join(IDX_FILES)}; raw or .gz) in a folder and pass it as the "
                "dataset path (or use 'fashion_mnist': apt-get install dataset-fashion-mnist)"
            )
        elif key == "omniglot":
            raise DatasetError(
                "dataset 'omniglot' needs a path to a folder laid out as "
                "alphabet/character/*.png (e.g. Omniglot's images_background)"
            )
        elif key == "imagefolder":
            raise DatasetError(
                f"dataset 'imagefolder' needs a path to a folder laid out as {_IMAGEFOLDER_LAYOUT}"
            )
        else:
            raise DatasetError(
                "dataset 'npz' needs a path to a .npz file with arrays 'x' (N,H,W[,C]) and 'y' (N,)"
            )
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


@functools.lru_cache(maxsize=8)
def _load_cached(key: str, path: str | None, image_size: int | None) -> ImageDataset:
    if key != DatasetName.digits and path is None:  # _resolve_path gives a path or raises
        raise DatasetError(f"dataset {key!r} needs a path")
    images, labels, names = _LOADERS[DatasetName(key)](path, image_size)
    if image_size is not None and images.shape[-2:] != (image_size, image_size):
        images = _resize(images, image_size)
    images = np.ascontiguousarray(images, dtype=np.float32)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return ImageDataset(name=key, images=images, labels=labels, class_names=tuple(names))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Resize a whole (N, C, H, W) batch at once; antialiased bilinear never overshoots [0, 1]."""
    import torch
    import torch.nn.functional as F

    out = np.empty((images.shape[0], images.shape[1], size, size), dtype=np.float32)
    for start in range(0, images.shape[0], 8192):  # bounded peak memory for 70k-image sets
        batch = torch.from_numpy(np.array(images[start : start + 8192], dtype=np.float32))
        out[start : start + 8192] = F.interpolate(
            batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        ).numpy()
    return out


# --------------------------------------------------------------------------- digits


def _load_digits() -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None, :, :]
    return images, np.asarray(bunch.target, dtype=np.int64), MNIST_CLASSES


# --------------------------------------------------------------------------- IDX (MNIST format)

_IDX_UBYTE = 0x08


def _missing_folder_hint(key: str) -> str:
    files = ", ".join(IDX_FILES)
    if key == "fashion_mnist":
        return (
            "install it with `apt-get install dataset-fashion-mnist` (Debian; puts the files in "
            f"{FASHION_MNIST_DIR}), or put the four files ({files}; raw or .gz) in a folder and "
            "pass it as the dataset path"
        )
    return f"put the four MNIST files ({files}; raw or .gz) in a folder and pass it as the path"


def _load_idx_folder(key: str, folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read train + t10k and concatenate them: our own task split decides who gets what."""
    if not folder.is_dir():
        raise DatasetError(f"{key} folder {folder} does not exist; {_missing_folder_hint(key)}")
    found: list[Path] = []
    missing: list[str] = []
    for base in IDX_FILES:
        raw, gz = folder / base, folder / f"{base}.gz"
        if raw.is_file():
            found.append(raw)
        elif gz.is_file():
            found.append(gz)
        else:
            missing.append(base)
    if missing:
        raise DatasetError(
            f"{key} folder {folder} lacks {', '.join(missing)} (raw or .gz); "
            f"{_missing_folder_hint(key)}"
        )
    class_names = FASHION_MNIST_CLASSES if key == "fashion_mnist" else MNIST_CLASSES
    images_parts, label_parts = [], []
    for img_path, lbl_path in ((found[0], found[1]), (found[2], found[3])):
        images = read_idx(img_path, ndim=3)
        labels = read_idx(lbl_path, ndim=1)
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"{img_path} has {images.shape[0]} images but {lbl_path} has "
                f"{labels.shape[0]} labels; the files do not belong together"
            )
        if labels.size and int(labels.max()) >= len(class_names):
            raise DatasetError(
                f"{lbl_path} has label {int(labels.max())}; {key} labels must be in "
                f"0..{len(class_names) - 1}"
            )
        images_parts.append(images)
        label_parts.append(labels)
    if images_parts[0].shape[1:] != images_parts[1].shape[1:]:
        raise DatasetError(
            f"{found[0]} has images of {images_parts[0].shape[1:]} pixels but {found[2]} has "
            f"{images_parts[1].shape[1:]}; both splits must have the same image size"
        )
    images = np.concatenate(images_parts)
    # uint8 -> float32 in [0, 1], one vectorised pass; (N, H, W) -> (N, 1, H, W).
    images_f = np.multiply(images, np.float32(1.0 / 255.0), dtype=np.float32)[:, None, :, :]
    return images_f, np.concatenate(label_parts).astype(np.int64), class_names


def read_idx(path: str | os.PathLike[str], ndim: int | None = None) -> np.ndarray:
    """Parse one IDX file (raw or ``.gz``) of unsigned bytes into a read-only uint8 array.

    The header is validated (zero bytes, dtype code 0x08, number of dims, exact data length)
    so that a wrong or damaged file fails here, naming the file, instead of yielding garbage.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4:
        raise DatasetError(f"IDX file {path} is truncated: {len(data)} bytes, no full header")
    zero0, zero1, dtype_code, dims = data[0], data[1], data[2], data[3]
    magic = int.from_bytes(data[:4], "big")
    if zero0 != 0 or zero1 != 0 or dtype_code != _IDX_UBYTE or (ndim is not None and dims != ndim):
        want = f"0x{0x0800 | (ndim or dims):08x}"
        raise DatasetError(
            f"IDX file {path} has bad magic number 0x{magic:08x} (expected {want}: unsigned-byte "
            f"data with {ndim or dims} dims); is it an MNIST-format file of the right kind?"
        )
    header_len = 4 + 4 * dims
    if len(data) < header_len:
        raise DatasetError(f"IDX file {path} is truncated inside its header ({len(data)} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=dims, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(data) - header_len
    if actual < expected:
        raise DatasetError(
            f"IDX file {path} is truncated: header says {shape} = {expected} bytes of data, "
            f"found {actual}; re-copy or re-download the file"
        )
    if actual > expected:
        raise DatasetError(
            f"IDX file {path} has {actual - expected} bytes after the {shape} data its header "
            "declares; the file is damaged or not an IDX file"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(shape)


# --------------------------------------------------------------------------- Omniglot folders


def _is_png(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() == ".png"


def _load_omniglot(root: Path, size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Every ``alphabet/character`` folder is one class named "alphabet/character"."""
    from PIL import Image, UnidentifiedImageError

    layout = "alphabet/character/*.png (e.g. Omniglot's images_background folder)"
    if not root.is_dir():
        raise DatasetError(
            f"omniglot folder {root} does not exist; expected a folder laid out as {layout}"
        )
    class_dirs = sorted(c for a in root.iterdir() if a.is_dir() for c in a.iterdir() if c.is_dir())
    files_per_class = [sorted(p for p in c.iterdir() if _is_png(p)) for c in class_dirs]
    if not any(files_per_class):
        deeper = any(
            _is_png(p)
            for c in class_dirs
            for sub in c.iterdir()
            if sub.is_dir()
            for p in sub.iterdir()
        )
        hint = (
            "; PNGs were found one level deeper: point the path at the folder that holds the "
            "alphabets (e.g. .../images_background)"
            if deeper
            else ""
        )
        raise DatasetError(
            f"omniglot folder {root} has no PNG images; expected a folder laid out as {layout}"
            f"{hint}"
        )
    empty = [c for c, files in zip(class_dirs, files_per_class, strict=True) if not files]
    if empty:
        raise DatasetError(
            f"omniglot character folder {empty[0]} has no .png images ({len(empty)} such folders);"
            " remove it or add its images: every character folder is a class"
        )
    total = sum(len(f) for f in files_per_class)
    images = np.empty((total, 1, size, size), dtype=np.float32)
    labels = np.empty(total, dtype=np.int64)
    names: list[str] = []
    i = 0
    for cls, (cdir, files) in enumerate(zip(class_dirs, files_per_class, strict=True)):
        names.append(f"{cdir.parent.name}/{cdir.name}")
        for f in files:
            try:
                with Image.open(f) as im:
                    im.load()
                    gray = im.convert("L")
                    if gray.size != (size, size):
                        # LANCZOS antialiases when shrinking Omniglot's 105x105 strokes.
                        gray = gray.resize((size, size), Image.Resampling.LANCZOS)
                    pixels = np.asarray(gray, dtype=np.float32)
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
                raise DatasetError(f"cannot read omniglot image {f}: {exc}") from exc
            # Omniglot is black strokes on a white page; invert so strokes are bright (1) on a
            # dark (0) background, the same polarity as MNIST/Fashion-MNIST and digits.
            images[i, 0] = 1.0 - pixels / 255.0
            labels[i] = cls
            i += 1
    return images, labels, tuple(names)


# --------------------------------------------------------------------------- ImageFolder trees

_IMAGEFOLDER_LAYOUT = (
    "root/<class>/<image>.png|.jpg|.jpeg (one folder per class, named after the class; the "
    "torchvision / Hugging Face ImageFolder layout)"
)
# Pillow modes by what they hold. 16-bit gray PNGs open as I;16 (or I in older Pillow); PNGs with
# 16-bit colour open as 8-bit RGB(A). Any other mode is refused, naming the file.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"})
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_COLOUR_MODES = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr"})


def _is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGEFOLDER_EXTENSIONS


def _scan_imagefolder(root: Path) -> tuple[list[Path], list[list[Path]]]:
    """The class folders (sorted by name) and each one's image files (sorted by name).

    Hidden entries (names starting with '.') are skipped everywhere; files at the root that are
    not images (a README, classes.json) are metadata and skipped too. Everything else that is not
    a class folder or an image in one is an error, so no image is ever dropped silently.
    """
    exts = "/".join(IMAGEFOLDER_EXTENSIONS)
    if not root.exists():
        raise DatasetError(
            f"imagefolder root {root} does not exist; expected a folder laid out as "
            f"{_IMAGEFOLDER_LAYOUT}"
        )
    if not root.is_dir():
        raise DatasetError(
            f"imagefolder root {root} is a file, not a folder; expected a folder laid out as "
            f"{_IMAGEFOLDER_LAYOUT}"
        )
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    class_dirs = [p for p in entries if p.is_dir()]
    loose = [p for p in entries if _is_image_file(p)]
    if loose:
        raise DatasetError(
            f"imagefolder root {root} has {len(loose)} image(s) directly in it (e.g. "
            f"{loose[0].name}); expected {_IMAGEFOLDER_LAYOUT}: move every image into the folder "
            "of its class"
        )
    if not class_dirs:
        raise DatasetError(
            f"imagefolder root {root} has no class folders; expected a folder laid out as "
            f"{_IMAGEFOLDER_LAYOUT}"
        )
    files_per_class: list[list[Path]] = []
    for cdir in class_dirs:
        files: list[Path] = []
        for p in sorted(cdir.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir():
                raise DatasetError(
                    f"class folder {cdir} holds a folder {p.name!r}; an imagefolder has its images "
                    f"directly in each class folder ({_IMAGEFOLDER_LAYOUT}); for "
                    "alphabet/character/*.png use dataset=omniglot"
                )
            if not _is_image_file(p):
                raise DatasetError(
                    f"{p} in class folder {cdir.name!r} is not a {exts} image; convert it to one "
                    "of those formats or move it out of the dataset"
                )
            files.append(p)
        files_per_class.append(files)
    empty = [c for c, files in zip(class_dirs, files_per_class, strict=True) if not files]
    if empty:
        raise DatasetError(
            f"class folder {empty[0]} has no {exts} images ({len(empty)} such folder(s): "
            f"{', '.join(repr(c.name) for c in empty[:5])}); add its images or remove it: every "
            "folder in the root is a class"
        )
    return class_dirs, files_per_class


def _image_mode(path: Path) -> str:
    """Pillow's mode of one image file, from its header alone."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DatasetError(
            f"cannot read image {path} (class folder {path.parent.name!r}): {exc}; replace or "
            "remove the file"
        ) from exc
    if mode not in _GRAY_MODES and mode not in _COLOUR_MODES:
        raise DatasetError(
            f"image {path} has Pillow mode {mode!r}, which this loader does not read; save it "
            "as 8-bit gray, RGB or RGBA"
        )
    return mode


def _decode_image(path: Path, mode: str, size: int) -> np.ndarray:
    """One image as float32 (C, size, size) in [0, 1] in ``mode`` ("L" or "RGB").

    Transparent pixels are composited onto white; 16-bit gray keeps its full range.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # as photo viewers show it
            if im.mode in _WIDE_GRAY_MODES:
                raw = np.asarray(im, dtype=np.int64)
                if raw.size and (int(raw.min()) < 0 or int(raw.max()) > 65535):
                    raise DatasetError(
                        f"image {path} has {im.mode!r} pixels {int(raw.min())}..{int(raw.max())};"
                        " expected 16-bit gray (0..65535); save it as 8- or 16-bit gray"
                    )
                gray = raw.astype(np.float32) / np.float32(65535.0)
                key = im.info.get("transparency")
                if isinstance(key, int):
                    gray[raw == key] = 1.0  # a transparent gray value: white, like alpha below
                resized = Image.fromarray(gray, mode="F").resize(
                    (size, size), Image.Resampling.LANCZOS
                )
                pixels = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)[None]
                return np.repeat(pixels, 3, axis=0) if mode == "RGB" else pixels
            if im.has_transparency_data:
                rgba = im.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, rgba)
            im = im.convert(mode)
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.LANCZOS)
            pixels = np.asarray(im, dtype=np.float32) / np.float32(255.0)
    except DatasetError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise DatasetError(
            f"cannot read image {path} (class folder {path.parent.name!r}): {exc}; replace or "
            "remove the file"
        ) from exc
    return pixels[None] if mode == "L" else pixels.transpose(2, 0, 1)


def _load_imagefolder(
    root: Path, size: int | None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``root/<class>/*.png|jpg|jpeg``: one class per folder, named after it, in sorted order.

    - Classes are the sub-folders of ``root`` sorted by name (Python string order, as
      torchvision's ``ImageFolder``); labels are positions in that order, images of a class are
      read in sorted file-name order, so the dataset is the same on every machine.
    - Mode: the dataset is RGB (3 channels) if any image is in colour (Pillow mode RGB, RGBA, P,
      PA, CMYK, ...; a palette image counts as colour whatever its palette), and its gray images
      are then converted to RGB (three equal channels) and a warning says how many; otherwise
      it is gray (1 channel). 16-bit gray PNGs keep their full range.
    - Transparent pixels (alpha, a palette's or a PNG's transparent colour) are composited onto
      white; JPEG EXIF orientation is applied. Pixels are otherwise kept as stored (no inversion).
    - Size: images may differ in size: every one is resized (Lanczos, aspect ratio not kept) to
      a ``size`` x ``size`` square; ``size=None`` means 28 for gray data and 32 for colour data.
    - Anything that would otherwise be dropped is an error naming the file or folder: an image
      Pillow cannot read, an empty class folder, a file of another type or a folder inside a class
      folder, images directly in the root, no class folders at all. Hidden entries (".name") are
      skipped, and so are non-image files at the root (metadata such as classes.json).
    """
    class_dirs, files_per_class = _scan_imagefolder(root)
    modes = [[_image_mode(f) for f in files] for files in files_per_class]
    colour = [
        (f, m)
        for files, ms in zip(files_per_class, modes, strict=True)
        for f, m in zip(files, ms, strict=True)
        if m in _COLOUR_MODES
    ]
    total = sum(len(f) for f in files_per_class)
    mode = "RGB" if colour else "L"
    if colour and len(colour) < total:
        gray = next(
            f
            for files, ms in zip(files_per_class, modes, strict=True)
            for f, m in zip(files, ms, strict=True)
            if m in _GRAY_MODES
        )
        _log.warning(
            "imagefolder %s mixes colour and gray images: %d of its %d images are gray (e.g. %s) "
            "and are converted to RGB (three equal channels), since %d are in colour (e.g. %s)",
            root,
            total - len(colour),
            total,
            gray,
            len(colour),
            colour[0][0],
        )
    size = DEFAULT_IMAGEFOLDER_SIZE[mode] if size is None else size
    channels = 3 if mode == "RGB" else 1
    images = np.empty((total, channels, size, size), dtype=np.float32)
    labels = np.empty(total, dtype=np.int64)
    i = 0
    for cls, files in enumerate(files_per_class):
        for f in files:
            images[i] = _decode_image(f, mode, size)
            labels[i] = cls
            i += 1
    return images, labels, tuple(c.name for c in class_dirs)


# --------------------------------------------------------------------------- generic .npz


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``x`` (N,H,W) or (N,H,W,C), ``y`` (N,) of any int or string labels, remapped to 0..K-1."""
    if not path.is_file():
        raise DatasetError(
            f"npz file {path} does not exist; expected a .npz with arrays 'x' (N,H,W[,C]) and "
            "'y' (N,) (write one with numpy.savez)"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DatasetError(f"cannot read npz file {path}: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DatasetError(
            f"{path} holds a single array, not a .npz archive; save it with "
            "numpy.savez(path, x=images, y=labels)"
        )
    with archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            raise DatasetError(
                f"npz file {path} lacks array(s) {', '.join(repr(k) for k in missing)} "
                f"(has {', '.join(repr(k) for k in archive.files) or 'none'}); save images "
                "as 'x' and labels as 'y'"
            )
        try:
            x = archive["x"]
            y = archive["y"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise DatasetError(f"cannot read npz file {path}: {exc}") from exc

    if x.ndim not in (3, 4):
        raise DatasetError(
            f"npz file {path}: 'x' has shape {x.shape}; expected (N,H,W) or (N,H,W,C)"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DatasetError(
            f"npz file {path}: 'y' has shape {y.shape} but 'x' has {x.shape[0]} images; "
            f"'y' must have shape ({x.shape[0]},)"
        )
    if x.shape[0] == 0:
        raise DatasetError(f"npz file {path} has no images")

    if x.dtype == np.uint8:
        images = np.multiply(x, np.float32(1.0 / 255.0), dtype=np.float32)
    elif np.issubdtype(x.dtype, np.integer) and not np.issubdtype(x.dtype, np.bool_):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DatasetError(
                f"npz file {path}: integer 'x' ({x.dtype}) has values {lo}..{hi}; integer images "
                "must be 0..255 (or store floats)"
            )
        images = x.astype(np.float32) / np.float32(255.0)
    elif np.issubdtype(x.dtype, np.floating):
        images = x.astype(np.float32)
        if not np.isfinite(images).all():
            raise DatasetError(
                f"npz file {path}: 'x' has {int((~np.isfinite(images)).sum())} non-finite values "
                "(NaN or inf) after conversion to float32; clean the data"
            )
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise DatasetError(
                f"npz file {path}: float 'x' has values {lo:g}..{hi:g}; float images must lie "
                "in [0, 1] (divide 0..255 pixels by 255, or store them as uint8)"
            )
    else:
        raise DatasetError(
            f"npz file {path}: 'x' has dtype {x.dtype}; expected uint8 (0..255) or float"
        )
    if images.ndim == 4 and images.shape[3] > 4 and images.shape[1] <= 4:
        raise DatasetError(
            f"npz file {path}: 'x' has shape {x.shape}, which looks channel-first "
            "(N,C,H,W); store images as (N,H,W) or (N,H,W,C), e.g. x.transpose(0, 2, 3, 1)"
        )
    images = images[:, None, :, :] if images.ndim == 3 else images.transpose(0, 3, 1, 2)

    if y.dtype.kind in "iu":
        values, labels = np.unique(y, return_inverse=True)
        names = tuple(str(int(v)) for v in values)
    elif y.dtype.kind in "US":
        values, labels = np.unique(y, return_inverse=True)
        names = tuple(v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist())
    else:
        raise DatasetError(
            f"npz file {path}: 'y' has dtype {y.dtype}; labels must be integers or strings"
        )
    return images, labels.reshape(-1).astype(np.int64), names


# --------------------------------------------------------------------------- registry

Loaded = tuple[np.ndarray, np.ndarray, tuple[str, ...]]
_LOADERS: dict[DatasetName, Callable[[str | None, int | None], Loaded]] = {
    DatasetName.digits: lambda path, size: _load_digits(),
    DatasetName.fashion_mnist: lambda path, size: _load_idx_folder("fashion_mnist", Path(path)),
    DatasetName.mnist: lambda path, size: _load_idx_folder("mnist", Path(path)),
    DatasetName.omniglot: lambda path, size: _load_omniglot(
        Path(path), size or DEFAULT_OMNIGLOT_SIZE
    ),
    DatasetName.npz: lambda path, size: _load_npz(Path(path)),
    DatasetName.imagefolder: lambda path, size: _load_imagefolder(Path(path), size),
}
