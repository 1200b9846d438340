"""The ImageFolder loader (``root/<class>/*.png|jpg|jpeg``) on tiny folders written here with PIL:
shapes, values, labels and class order, resizing, gray vs colour, transparency, every malformed
layout, and the class-disjoint split into training and target nodes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from gating.data import (
    DATASET_NAMES,
    DatasetError,
    TaskSpec,
    build_node_task,
    class_split,
    clear_dataset_cache,
    load_dataset,
)

SIZES = ((40, 40), (64, 48), (17, 23))  # (width, height): square, landscape, portrait
FORMATS = ("png", "jpg", "jpeg")


# --------------------------------------------------------------------------- helpers


def draw(size: tuple[int, int], seed: int, mode: str) -> Image.Image:
    """A bar and a random stroke on a plain background; distinct per seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
    fill = colour if mode == "RGB" else colour[0]
    img = Image.new(mode, size, (255, 255, 255) if mode == "RGB" else 255)
    pen = ImageDraw.Draw(img)
    pen.rectangle([w // 4, h // 4, w // 2, 3 * h // 4], fill=fill)
    points = [tuple(int(v) for v in rng.integers(0, min(w, h), size=2)) for _ in range(3)]
    pen.line(points, fill=fill, width=3)
    return img


def make_folder(
    root: Path, classes: list[str], per_class: int = 3, mode: str = "L", seed: int = 0
) -> Path:
    """``root/<class>/img<i>.<png|jpg|jpeg>`` with sizes cycling through SIZES."""
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = draw(SIZES[i % len(SIZES)], seed * 1000 + c * 10 + i, mode)
            img.save(folder / f"img{i}.{FORMATS[(c + i) % len(FORMATS)]}")
    return root


def solid(path: Path, mode: str, value: object, size: tuple[int, int] = (10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Tests change folders between loads; the loader caches by path."""
    clear_dataset_cache()


# --------------------------------------------------------------------------- loading


def test_imagefolder_is_a_dataset_name() -> None:
    assert "imagefolder" in DATASET_NAMES


def test_gray_folder_loads_sorted_and_stable(tmp_path: Path) -> None:
    names = ["zebra", "Apple", "c10", "c9", "b"]
    root = make_folder(tmp_path / "data", names, per_class=3)
    ds = load_dataset("imagefolder", str(root))
    assert ds.name == "imagefolder"
    assert ds.class_names == ("Apple", "b", "c10", "c9", "zebra")  # Python string order
    assert ds.images.shape == (15, 1, 28, 28)  # gray default: 28
    assert ds.image_shape == (1, 28, 28)
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int64
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    assert float(ds.images.max()) == 1.0  # white backgrounds
    assert ds.labels.tolist() == [k for k in range(5) for _ in range(3)]
    assert not ds.images.flags.writeable
    # Image i of class "c9" is img<i> of folder c9: compare with a direct PIL read.
    with Image.open(root / "c9" / "img0.png") as im:
        expected = np.asarray(im.convert("L").resize((28, 28), Image.Resampling.LANCZOS)) / 255.0
    np.testing.assert_allclose(ds.images[9, 0], expected, atol=1e-6)
    clear_dataset_cache()
    again = load_dataset("imagefolder", str(root))
    assert again is not ds
    np.testing.assert_array_equal(again.images, ds.images)
    np.testing.assert_array_equal(again.labels, ds.labels)


def test_image_size_resizes_mixed_sizes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", ["a", "b"], per_class=3)
    ds = load_dataset("imagefolder", str(root), image_size=20)
    assert ds.images.shape == (6, 1, 20, 20)
    # Non-square images are stretched, not cropped: a left-dark / right-light 60x20 image stays
    # dark on the left and light on the right.
    img = Image.new("L", (60, 20), 255)
    ImageDraw.Draw(img).rectangle([0, 0, 29, 19], fill=0)
    img.save(root / "a" / "wide.png")
    clear_dataset_cache()
    ds = load_dataset("imagefolder", str(root), image_size=20)
    wide = ds.images[3, 0]  # sorted: img0, img1, img2, wide
    assert wide[:, :8].max() < 0.05 and wide[:, 12:].min() > 0.95


def test_colour_folder_has_three_channels(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", ["a", "b", "c"], per_class=2, mode="RGB")
    solid(root / "red" / "red.png", "RGB", (255, 0, 0))
    ds = load_dataset("imagefolder", str(root))
    assert ds.images.shape == (7, 3, 32, 32)  # colour default: 32
    assert ds.class_names == ("a", "b", "c", "red")
    red = ds.images[ds.labels == 3][0]
    np.testing.assert_allclose(red[0], 1.0)
    np.testing.assert_allclose(red[1:], 0.0)
    assert load_dataset("imagefolder", str(root), image_size=12).images.shape == (7, 3, 12, 12)


def test_mixed_gray_and_colour_becomes_rgb_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = make_folder(tmp_path / "data", ["a", "b"], per_class=2, mode="L")
    solid(root / "c" / "colour.png", "RGB", (0, 0, 255))
    solid(root / "c" / "gray.jpg", "L", 100)
    with caplog.at_level(logging.WARNING, logger="gating.data.datasets"):
        ds = load_dataset("imagefolder", str(root))
    assert ds.images.shape == (6, 3, 32, 32)
    assert "5 of its 6 images are gray" in caplog.text and "converted to RGB" in caplog.text
    gray = ds.images[5]  # class c: colour.png, gray.jpg
    np.testing.assert_array_equal(gray[0], gray[1])
    np.testing.assert_array_equal(gray[0], gray[2])
    np.testing.assert_allclose(gray, 100 / 255, atol=2 / 255)
    np.testing.assert_allclose(ds.images[4][2], 1.0)


def test_palette_image_counts_as_colour(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", ["a"], per_class=1, mode="L")
    solid(root / "b" / "p.png", "P", 0)
    assert load_dataset("imagefolder", str(root)).image_shape == (3, 32, 32)


def test_transparency_is_composited_onto_white(tmp_path: Path) -> None:
    root = tmp_path / "data"
    solid(root / "rgba" / "clear.png", "RGBA", (0, 0, 0, 0))
    solid(root / "rgba" / "half.png", "RGBA", (0, 0, 0, 128))
    solid(root / "la" / "clear.png", "LA", (0, 0))
    ds = load_dataset("imagefolder", str(root), image_size=8)
    assert ds.class_names == ("la", "rgba")
    np.testing.assert_allclose(ds.images[0], 1.0)  # gray + alpha, now RGB: white
    np.testing.assert_allclose(ds.images[1], 1.0)  # fully transparent black: white
    np.testing.assert_allclose(ds.images[2], 127 / 255, atol=1 / 255)  # half-transparent black
    # Gray with alpha alone stays gray.
    clear_dataset_cache()
    gray_only = tmp_path / "gray"
    solid(gray_only / "la" / "clear.png", "LA", (0, 0))
    solid(gray_only / "l" / "black.png", "L", 0)
    ds = load_dataset("imagefolder", str(gray_only), image_size=8)
    assert ds.image_shape == (1, 8, 8)
    np.testing.assert_allclose(ds.images[0], 0.0)
    np.testing.assert_allclose(ds.images[1], 1.0)


def test_sixteen_bit_gray_keeps_its_range(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "wide").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(root / "wide" / "white.png")
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(root / "wide" / "mid.png")
    ds = load_dataset("imagefolder", str(root), image_size=8)
    assert ds.image_shape == (1, 8, 8)
    np.testing.assert_allclose(ds.images[0], 32768 / 65535, atol=1e-6)  # sorted: mid, white
    np.testing.assert_allclose(ds.images[1], 1.0, atol=1e-6)


def test_hidden_entries_and_root_metadata_are_skipped(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", ["a", "b"], per_class=2)
    (root / "classes.json").write_text("{}")
    (root / "README.md").write_text("about")
    (root / ".cache").mkdir()
    (root / "a" / ".DS_Store").write_bytes(b"\0\1")
    ds = load_dataset("imagefolder", str(root))
    assert ds.class_names == ("a", "b") and len(ds) == 4


# --------------------------------------------------------------------------- bad input


def test_root_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing does not exist.*root/<class>/<image>"):
        load_dataset("imagefolder", str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="needs a path to a folder laid out as root/<class>"):
        load_dataset("imagefolder")


def test_root_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"x\.png is a file, not a folder"):
        load_dataset("imagefolder", str(tmp_path / "x.png"))


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(
        DatasetError, match=r"has no class folders; expected .*one folder per class"
    ):
        load_dataset("imagefolder", str(tmp_path / "empty"))


def test_images_directly_in_root(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    solid(root / "cat1.png", "L", 0)
    solid(root / "cat2.JPG", "L", 0)
    with pytest.raises(
        DatasetError, match=r"2 image\(s\) directly in it \(e\.g\. cat1\.png\).*move every image"
    ):
        load_dataset("imagefolder", str(root))
    # Even next to proper class folders: they would otherwise be dropped.
    make_folder(root, ["a", "b"], per_class=1)
    clear_dataset_cache()
    with pytest.raises(DatasetError, match=r"directly in it"):
        load_dataset("imagefolder", str(root))


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", ["a", "b"], per_class=2)
    (root / "lonely").mkdir()
    with pytest.raises(DatasetError, match=r"class folder \S*lonely has no \.png/\.jpg/\.jpeg"):
        load_dataset("imagefolder", str(root))


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", ["a", "b"], per_class=2)
    (root / "b" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(
        DatasetError, match=r"cannot read image \S*b/broken\.png \(class folder 'b'\)"
    ):
        load_dataset("imagefolder", str(root))


def test_truncated_image_is_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", ["a", "b"], per_class=2)
    good = (root / "a" / "img1.jpg").read_bytes()
    (root / "a" / "cut.jpg").write_bytes(good[: len(good) // 2])  # a valid header, half the data
    with pytest.raises(DatasetError, match=r"cannot read image \S*a/cut\.jpg"):
        load_dataset("imagefolder", str(root))


def test_other_files_in_a_class_folder_are_refused(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", ["a", "b"], per_class=2)
    Image.new("L", (8, 8)).save(root / "b" / "extra.bmp")
    with pytest.raises(DatasetError, match=r"b/extra\.bmp in class folder 'b' is not a \.png"):
        load_dataset("imagefolder", str(root))


def test_nested_folders_are_refused(tmp_path: Path) -> None:
    make_folder(tmp_path / "omni" / "Alphabet", ["char1", "char2"], per_class=2)
    with pytest.raises(DatasetError, match=r"Alphabet holds a folder 'char1'.*dataset=omniglot"):
        load_dataset("imagefolder", str(tmp_path / "omni"))


# --------------------------------------------------------------------------- federated split


def test_too_few_images_names_the_class_folder(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", [f"class_{k:02d}" for k in range(6)], per_class=4)
    next((root / "class_03").glob("img3.*")).unlink()  # class_03 now has 3 images
    ds = load_dataset("imagefolder", str(root))
    spec = TaskSpec(ways=3, shots=2, queries=2, train_pool=4, target_nodes=1, holdout_samples=0.0)
    with pytest.raises(
        DatasetError, match=r"class 3 \('class_03'\) of dataset 'imagefolder' has 3"
    ):
        build_node_task(ds, spec, seed=0, partition_id=0, num_partitions=3)


def test_many_classes_split_class_disjoint(tmp_path: Path) -> None:
    names = [f"class_{k:02d}" for k in range(24)]  # 24 >= 4 x 5 ways: "auto" holds out 25%
    root = make_folder(tmp_path / "data", names, per_class=4, mode="RGB")
    ds = load_dataset("imagefolder", str(root), image_size=16)
    spec = TaskSpec(ways=5, shots=1, queries=2, train_pool=4, target_nodes=3)
    partitions = 9
    tasks = [build_node_task(ds, spec, 0, p, partitions) for p in range(partitions)]
    train = [t for t in tasks if t.role == "train"]
    target = [t for t in tasks if t.role == "target"]
    assert len(train) == 6 and len(target) == 3
    train_classes = {c for t in train for c in t.classes}
    target_classes = {c for t in target for c in t.classes}
    assert not train_classes & target_classes
    train_rows = {int(i) for t in train for i in t.sample_ids}
    target_rows = {int(i) for t in target for i in t.sample_ids}
    assert not train_rows & target_rows
    assert all(
        np.isin(t.sample_ids, np.flatnonzero(np.isin(ds.labels, t.classes))).all() for t in tasks
    )

    split = class_split(ds, spec, 0)
    assert split["disjoint"] is True
    assert split["dataset"] == "imagefolder" and split["num_classes"] == 24
    assert split["holdout_classes"] == 0.25
    assert len(split["target"]) == 6 and len(split["train"]) == 18
    assert sorted(split["train"] + split["target"]) == names
    assert {ds.class_names[c] for c in train_classes} <= set(split["train"])
    assert {ds.class_names[c] for c in target_classes} <= set(split["target"])
    assert class_split(ds, spec, 0) == split  # a function of (dataset, spec, seed)
    assert class_split(ds, spec, 1) != split


def test_few_classes_share_classes_not_samples(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", [f"c{k}" for k in range(6)], per_class=6)
    ds = load_dataset("imagefolder", str(root))
    spec = TaskSpec(ways=3, shots=1, queries=1, train_pool=4, target_nodes=1, holdout_samples=0.5)
    split = class_split(ds, spec, 0)
    assert split["disjoint"] is False and split["holdout_classes"] == 0.0
    assert split["train"] == split["target"] == list(ds.class_names)
    train = build_node_task(ds, spec, 0, 0, 2)
    target = build_node_task(ds, spec, 0, 1, 2)
    assert not set(train.sample_ids.tolist()) & set(target.sample_ids.tolist())


def test_config_group_matches_the_schema() -> None:
    from omegaconf import OmegaConf

    from conf.schema import DatasetConfig

    yaml = Path(__file__).resolve().parents[1] / "conf" / "dataset" / "imagefolder.yaml"
    raw = OmegaConf.load(yaml)
    assert OmegaConf.is_missing(raw, "path")
    cfg = OmegaConf.merge(OmegaConf.structured(DatasetConfig), raw)
    assert cfg.name == "imagefolder" and cfg.image_size is None
