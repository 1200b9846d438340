"""Dataset loaders on real files: the bundled digits, the Debian Fashion-MNIST package, and IDX
files (synthetic bytes), Omniglot-style PNG folders and .npz archives written here, with every
malformed case."""

from __future__ import annotations

import gzip
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from gating.data import (
    DATASET_NAMES,
    FASHION_MNIST_DIR,
    DatasetError,
    load_dataset,
    read_idx,
)

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# --------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    """A real IDX file: zero bytes, dtype code 0x08, ndim, big-endian dims, then the data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray) -> Path:
    data = idx_bytes(arr)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def idx_sample() -> tuple[np.ndarray, np.ndarray]:
    """What the IDX files of a 30-image MNIST-style folder hold: random 28x28 uint8 pixels (every
    byte value) and labels 0..9, read-only."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=30, dtype=np.uint8)
    pixels.flags.writeable = labels.flags.writeable = False
    return pixels, labels


def write_idx_folder(folder: Path, images: np.ndarray, labels: np.ndarray, gz: bool) -> Path:
    """20 train + the rest as t10k, like the real MNIST layout."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", images[:20])
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", labels[:20])
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", images[20:])
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", labels[20:])
    return folder


def draw_character(path: Path, seed: int, size: int = 105) -> None:
    """An Omniglot-like PNG: black pen strokes on a white page, 1-bit like the real files."""
    rng = np.random.default_rng(seed)
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    points = [tuple(int(v) for v in rng.integers(15, size - 15, size=2)) for _ in range(4)]
    draw.line(points, fill=0, width=7)
    draw.line([(10, size // 2), (size - 10, size // 2)], fill=0, width=7)  # always a middle bar
    img.convert("1").save(path)


def make_omniglot(root: Path, alphabets: int = 3, characters: int = 2, drawings: int = 3) -> Path:
    for a in range(alphabets):
        for c in range(characters):
            folder = root / f"Alphabet_{a}" / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(drawings):
                draw_character(folder / f"{a:02d}{c:02d}_{d:02d}.png", seed=a * 100 + c * 10 + d)
    return root


# --------------------------------------------------------------------------- bundled + Debian


def test_digits_loads() -> None:
    ds = load_dataset("digits")
    assert ds.name == "digits"
    assert ds.images.shape == (1797, 1, 8, 8)
    assert ds.image_shape == (1, 8, 8)
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int64
    assert ds.num_classes == 10 and len(ds) == 1797
    assert ds.images.min() == 0.0 and ds.images.max() == 1.0
    assert set(np.unique(ds.labels).tolist()) == set(range(10))


def test_fashion_mnist_loads_from_debian_package() -> None:
    start = time.perf_counter()
    ds = load_dataset("fashion_mnist")
    elapsed = time.perf_counter() - start
    assert ds.images.shape == (70000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.class_names[0] == "T-shirt/top"
    assert np.bincount(ds.labels).tolist() == [7000] * 10
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    assert elapsed < 10.0, f"loading Fashion-MNIST took {elapsed:.1f} s"
    # Same as parsing the package's files directly.
    first = read_idx(Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz", ndim=1)
    np.testing.assert_array_equal(ds.labels[60000:], first)


def test_cache_returns_same_read_only_arrays() -> None:
    a = load_dataset("digits")
    b = load_dataset("Digits")
    assert a is b
    assert not a.images.flags.writeable and not a.labels.flags.writeable
    with pytest.raises(ValueError):
        a.images[0, 0, 0, 0] = 5.0


def test_resize_to_image_size() -> None:
    ds = load_dataset("digits", image_size=16)
    assert ds.images.shape == (1797, 1, 16, 16)
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DatasetError, match="valid names are: digits, fashion_mnist"):
        load_dataset("cifar10")
    assert "omniglot" in DATASET_NAMES


def test_digits_rejects_a_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="takes no path"):
        load_dataset("digits", str(tmp_path))


def test_bad_image_size() -> None:
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset("digits", image_size=0)


# --------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_round_trip(tmp_path: Path, idx_sample, gz: bool) -> None:
    pixels, labels = idx_sample
    folder = write_idx_folder(tmp_path / "idx", pixels, labels, gz=gz)
    for name in ("mnist", "fashion_mnist"):
        ds = load_dataset(name, str(folder))
        assert ds.images.shape == (30, 1, 28, 28)
        np.testing.assert_array_equal(np.rint(ds.images[:, 0] * 255).astype(np.uint8), pixels)
        np.testing.assert_array_equal(ds.labels, labels.astype(np.int64))
    raw = read_idx(folder / ("train-images-idx3-ubyte" + (".gz" if gz else "")), ndim=3)
    np.testing.assert_array_equal(raw, pixels[:20])


def test_idx_mixed_raw_and_gz(tmp_path: Path, idx_sample) -> None:
    pixels, labels = idx_sample
    folder = write_idx_folder(tmp_path / "idx", pixels, labels, gz=True)
    gz_file = folder / "t10k-images-idx3-ubyte.gz"
    with gzip.open(gz_file, "rb") as src, open(folder / "t10k-images-idx3-ubyte", "wb") as dst:
        shutil.copyfileobj(src, dst)
    gz_file.unlink()
    ds = load_dataset("mnist", str(folder))
    assert ds.images.shape[0] == 30


def test_idx_wrong_magic(tmp_path: Path, idx_sample) -> None:
    pixels, labels = idx_sample
    folder = write_idx_folder(tmp_path / "idx", pixels, labels, gz=False)
    bad = folder / "train-images-idx3-ubyte"
    data = bytearray(bad.read_bytes())
    data[2] = 0x0D  # float data type code
    bad.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte has bad magic number"):
        load_dataset("mnist", str(folder))


def test_idx_labels_file_in_place_of_images(tmp_path: Path, idx_sample) -> None:
    pixels, labels = idx_sample
    folder = write_idx_folder(tmp_path / "idx", pixels, labels, gz=False)
    write_idx(folder / "t10k-images-idx3-ubyte", labels[20:])
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte has bad magic.*0x00000803"):
        load_dataset("mnist", str(folder))


def test_idx_truncated(tmp_path: Path, idx_sample) -> None:
    pixels, labels = idx_sample
    folder = write_idx_folder(tmp_path / "idx", pixels, labels, gz=True)
    target = folder / "train-images-idx3-ubyte.gz"
    data = idx_bytes(pixels[:20])[:-100]
    with gzip.open(target, "wb") as fh:
        fh.write(data)
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz is truncated"):
        load_dataset("mnist", str(folder))


def test_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DatasetError, match="truncated inside its header"):
        read_idx(path, ndim=3)


def test_idx_trailing_bytes(tmp_path: Path, idx_sample) -> None:
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(idx_sample[0][:2]) + b"junk")
    with pytest.raises(DatasetError, match="4 bytes after"):
        read_idx(path, ndim=3)


def test_idx_corrupt_gzip(tmp_path: Path, idx_sample) -> None:
    pixels, labels = idx_sample
    folder = write_idx_folder(tmp_path / "idx", pixels, labels, gz=True)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DatasetError, match=r"cannot read IDX file .*train-labels-idx1-ubyte.gz"):
        load_dataset("mnist", str(folder))


def test_idx_count_mismatch(tmp_path: Path, idx_sample) -> None:
    pixels, labels = idx_sample
    folder = write_idx_folder(tmp_path / "idx", pixels, labels, gz=False)
    write_idx(folder / "train-labels-idx1-ubyte", labels[:19])
    with pytest.raises(DatasetError, match=r"has 20 images but .*train-labels.* has 19 labels"):
        load_dataset("mnist", str(folder))


def test_idx_label_out_of_range(tmp_path: Path, idx_sample) -> None:
    pixels, labels = idx_sample
    folder = write_idx_folder(tmp_path / "idx", pixels, labels, gz=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.full(10, 12, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"label 12; mnist labels must be in 0..9"):
        load_dataset("mnist", str(folder))


def test_idx_missing_folder_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"does not exist; install it with `apt-get install "):
        load_dataset("fashion_mnist", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"does not exist; put the four MNIST files"):
        load_dataset("mnist", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match=r"'mnist' needs a path.*train-images-idx3-ubyte"):
        load_dataset("mnist")


def test_idx_missing_file(tmp_path: Path, idx_sample) -> None:
    pixels, labels = idx_sample
    folder = write_idx_folder(tmp_path / "idx", pixels, labels, gz=False)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match=r"lacks t10k-labels-idx1-ubyte \(raw or .gz\)"):
        load_dataset("mnist", str(folder))


# --------------------------------------------------------------------------- Omniglot folders


def test_omniglot_folder_loads_inverted(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path / "omniglot")
    ds = load_dataset("omniglot", str(root))
    assert ds.images.shape == (18, 1, 28, 28)
    assert ds.num_classes == 6
    assert ds.class_names[0] == "Alphabet_0/character01"
    assert ds.class_names[-1] == "Alphabet_2/character02"
    assert np.bincount(ds.labels).tolist() == [3] * 6
    # Strokes bright on a dark page: corners are background, the drawn middle bar is bright.
    assert float(ds.images[:, 0, :2, :2].max()) < 0.05
    assert float(ds.images[:, 0, 14, 6:22].mean()) > 0.8
    assert float(ds.images.mean()) < 0.4
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0


def test_omniglot_image_size(tmp_path: Path) -> None:
    ds = load_dataset("omniglot", str(make_omniglot(tmp_path / "o", 1, 2, 2)), image_size=20)
    assert ds.images.shape == (4, 1, 20, 20)


def test_omniglot_unreadable_png(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path / "omniglot")
    bad = root / "Alphabet_1" / "character02" / "garbage.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    with pytest.raises(DatasetError, match=r"cannot read omniglot image .*character02/garbage.png"):
        load_dataset("omniglot", str(root))


def test_omniglot_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"has no PNG images; expected .*alphabet/character"):
        load_dataset("omniglot", str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("omniglot", str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="needs a path"):
        load_dataset("omniglot")


def test_omniglot_one_level_too_high(tmp_path: Path) -> None:
    make_omniglot(tmp_path / "omniglot" / "images_background", 1, 1, 1)
    with pytest.raises(DatasetError, match="one level deeper"):
        load_dataset("omniglot", str(tmp_path / "omniglot"))


def test_omniglot_empty_character_folder(tmp_path: Path) -> None:
    root = make_omniglot(tmp_path / "omniglot", 1, 2, 2)
    (root / "Alphabet_0" / "character09").mkdir()
    with pytest.raises(DatasetError, match=r"character09 has no .png images"):
        load_dataset("omniglot", str(root))


# --------------------------------------------------------------------------- .npz


def test_npz_round_trip_nhw(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(12, 6, 5), dtype=np.uint8)
    y = np.array([42, 7, 7, 100, 42, 7, 100, 100, 42, 7, 42, 7])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset("npz", str(tmp_path / "d.npz"))
    assert ds.images.shape == (12, 1, 6, 5) and ds.images.dtype == np.float32
    np.testing.assert_allclose(ds.images[:, 0], x / 255.0, rtol=1e-6)
    assert ds.class_names == ("7", "42", "100")
    assert [ds.class_names[i] for i in ds.labels] == [str(v) for v in y]
    assert ds.labels.min() == 0 and ds.labels.max() == 2


def test_npz_round_trip_nhwc_float_string_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((8, 4, 4, 3)).astype(np.float32)
    y = np.array(["cat", "dog", "ant", "dog", "cat", "ant", "ant", "dog"])
    path = tmp_path / "rgb.npz"
    np.savez_compressed(path, x=x, y=y)
    ds = load_dataset("npz", str(path))
    assert ds.images.shape == (8, 3, 4, 4) and ds.image_shape == (3, 4, 4)
    np.testing.assert_array_equal(ds.images, x.transpose(0, 3, 1, 2))
    assert ds.class_names == ("ant", "cat", "dog")
    assert [ds.class_names[i] for i in ds.labels] == y.tolist()


def test_npz_missing_key(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 3, 3), np.uint8), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"lacks array\(s\) 'x' \(has 'images', 'y'\)"):
        load_dataset("npz", str(tmp_path / "d.npz"))


def test_npz_shape_mismatch(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"'y' has shape \(2,\) but 'x' has 3 images"):
        load_dataset("npz", str(tmp_path / "d.npz"))
    np.savez(tmp_path / "f.npz", x=np.zeros((3, 4), np.uint8), y=np.array([0, 1, 2]))
    with pytest.raises(DatasetError, match=r"expected \(N,H,W\) or \(N,H,W,C\)"):
        load_dataset("npz", str(tmp_path / "f.npz"))


def test_npz_non_finite(tmp_path: Path) -> None:
    x = np.zeros((3, 4, 4), np.float32)
    x[1, 2, 2] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 2]))
    with pytest.raises(DatasetError, match="1 non-finite values"):
        load_dataset("npz", str(tmp_path / "d.npz"))


def test_npz_unreadable_or_missing(tmp_path: Path) -> None:
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 this is a broken zip")
    with pytest.raises(DatasetError, match=r"cannot read npz file .*bad.npz"):
        load_dataset("npz", str(tmp_path / "bad.npz"))
    with pytest.raises(DatasetError, match=r"does not exist; expected a .npz"):
        load_dataset("npz", str(tmp_path / "none.npz"))
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DatasetError, match=r"not a .npz archive"):
        load_dataset("npz", str(tmp_path / "single.npy"))


def test_npz_bad_dtypes(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.full((2, 3, 3), 300, np.int32), y=np.array([0, 1]))
    with pytest.raises(DatasetError, match=r"integer images must be 0..255"):
        load_dataset("npz", str(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", x=np.zeros((2, 3, 3), np.uint8), y=np.array([0.5, 1.5]))
    with pytest.raises(DatasetError, match="labels must be integers or strings"):
        load_dataset("npz", str(tmp_path / "b.npz"))
