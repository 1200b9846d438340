"""The federated split on real data: determinism, disjoint training/target nodes, episode shape,
and a clear error for every impossible configuration."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gating.data import (
    DatasetError,
    ImageDataset,
    NodeTask,
    TaskSpec,
    build_node_task,
    load_dataset,
    node_role,
    split_classes,
    task_from_site_data,
)

REPO = Path(__file__).resolve().parents[1]
NUM_PARTITIONS = 20


@pytest.fixture(scope="module")
def many_classes(tmp_path_factory: pytest.TempPathFactory) -> ImageDataset:
    """40 classes x 25 samples in a real .npz file; pixel (0, 0) encodes the sample's row so that
    episodes can be traced back to dataset rows, the rest is a per-class stroke pattern."""
    rng = np.random.default_rng(7)
    n_classes, per_class = 40, 25
    templates = rng.random((n_classes, 8, 8)) > 0.6
    labels = np.repeat(np.arange(n_classes) * 3 + 5, per_class)  # non-contiguous ids 5, 8, ...
    order = rng.permutation(labels.size)
    labels = labels[order]
    x = np.empty((labels.size, 8, 8), dtype=np.float32)
    for i, y in enumerate(labels):
        x[i] = np.clip(templates[(y - 5) // 3] + rng.normal(0, 0.1, (8, 8)), 0, 1)
        x[i, 0, 0] = i / labels.size
    path = tmp_path_factory.mktemp("npz") / "many.npz"
    np.savez(path, x=x, y=labels)
    return load_dataset("npz", str(path))


def row_of(images: torch.Tensor, n: int) -> np.ndarray:
    """Dataset rows of images from the `many_classes` file (pixel (0, 0) = row / n)."""
    return np.rint(images[:, 0, 0, 0].numpy() * n).astype(np.int64)


def all_tasks(ds: ImageDataset, spec: TaskSpec, seed: int = 0, n: int = NUM_PARTITIONS):
    return [build_node_task(ds, spec, seed, pid, n) for pid in range(n)]


# --------------------------------------------------------------------------- determinism


def test_same_seed_and_partition_give_the_same_task(digits: ImageDataset) -> None:
    spec = TaskSpec()
    a = build_node_task(digits, spec, 3, 4, NUM_PARTITIONS)
    b = build_node_task(digits, spec, 3, 4, NUM_PARTITIONS)
    assert a.classes == b.classes
    np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    fa, fb = a.fixed_episode(), b.fixed_episode()
    assert torch.equal(fa.query_x, fb.query_x) and torch.equal(fa.support_y, fb.support_y)


def test_split_does_not_depend_on_global_rng_or_process(digits: ImageDataset) -> None:
    """A fresh interpreter (as in another Ray worker or a deployed node) with global RNG state
    disturbed must build exactly the same task."""
    spec = TaskSpec()
    here = build_node_task(digits, spec, 11, 17, NUM_PARTITIONS)
    code = (
        "import random, numpy as np, torch\n"
        "random.seed(1); np.random.seed(2); torch.manual_seed(3)\n"
        "from gating.data import TaskSpec, build_node_task, load_dataset\n"
        "t = build_node_task(load_dataset('digits'), TaskSpec(), 11, 17, 20)\n"
        "print(list(t.classes), t.sample_ids.tolist())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"{list(here.classes)} {here.sample_ids.tolist()}"


def test_different_seeds_give_different_tasks(digits: ImageDataset) -> None:
    spec = TaskSpec()
    a, b = all_tasks(digits, spec, seed=0), all_tasks(digits, spec, seed=1)
    assert any(x.classes != y.classes for x, y in zip(a, b, strict=True))
    assert all(not np.array_equal(x.sample_ids, y.sample_ids) for x, y in zip(a, b, strict=True))


def test_nodes_differ_from_each_other(digits: ImageDataset) -> None:
    tasks = all_tasks(digits, TaskSpec())
    assert len({t.classes for t in tasks}) > NUM_PARTITIONS // 2


# --------------------------------------------------------------------------- roles and disjointness


def test_roles() -> None:
    spec = TaskSpec(target_nodes=3)
    roles = [node_role(p, 10, spec) for p in range(10)]
    assert roles == ["train"] * 7 + ["target"] * 3
    assert node_role(0, 1, TaskSpec(target_nodes=0)) == "train"


def check_task(task: NodeTask, ds: ImageDataset) -> None:
    """Node-local labels really are the node's classes, in the node's order."""
    spec = task.spec
    assert len(task.classes) == spec.ways == len(set(task.classes))
    assert task.labels.min() == 0 and task.labels.max() == spec.ways - 1
    expected = np.array(task.classes)[task.labels]
    np.testing.assert_array_equal(ds.labels[task.sample_ids], expected)
    np.testing.assert_array_equal(task.images, ds.images[task.sample_ids])
    assert len(np.unique(task.sample_ids)) == task.sample_ids.size
    per_class = np.bincount(task.labels, minlength=spec.ways)
    if task.role == "target":
        assert per_class.tolist() == [spec.shots + spec.queries] * spec.ways
    else:
        assert (per_class >= spec.shots + spec.queries).all()
        assert (per_class <= spec.train_pool).all()


def test_training_and_target_nodes_disjoint_in_samples(digits: ImageDataset) -> None:
    spec = TaskSpec()
    tasks = all_tasks(digits, spec)
    train_ids = np.concatenate([t.sample_ids for t in tasks if t.role == "train"])
    target_ids = np.concatenate([t.sample_ids for t in tasks if t.role == "target"])
    assert [t.role for t in tasks].count("target") == spec.target_nodes
    assert np.intersect1d(train_ids, target_ids).size == 0
    # Without held-out classes, both sides draw from all 10 classes.
    train_classes, target_classes = split_classes(10, spec, 0)
    np.testing.assert_array_equal(train_classes, target_classes)
    for t in tasks:
        check_task(t, digits)
        assert t.sample_ids.size == spec.ways * (40 if t.role == "train" else 20)


def test_fashion_mnist_split(digits: ImageDataset) -> None:
    fashion = load_dataset("fashion_mnist")
    spec = TaskSpec(ways=5, shots=1, queries=15, train_pool=100)
    tasks = all_tasks(fashion, spec, seed=5, n=30)
    train_ids = np.concatenate([t.sample_ids for t in tasks if t.role == "train"])
    target_ids = np.concatenate([t.sample_ids for t in tasks if t.role == "target"])
    assert np.intersect1d(train_ids, target_ids).size == 0
    for t in tasks:
        check_task(t, fashion)
    assert tasks[0].images.shape == (500, 1, 28, 28)


def test_held_out_classes_with_many_classes(many_classes: ImageDataset) -> None:
    spec = TaskSpec(target_nodes=6)
    assert many_classes.num_classes == 40 and many_classes.class_names[:2] == ("5", "8")
    train_classes, target_classes = split_classes(40, spec, 0)
    assert target_classes.size == 10 and train_classes.size == 30  # "auto" = 25 %
    assert np.intersect1d(train_classes, target_classes).size == 0
    tasks = all_tasks(many_classes, spec)
    seen = {"train": set(), "target": set()}
    ids = {"train": [], "target": []}
    for t in tasks:
        check_task(t, many_classes)
        seen[t.role].update(t.classes)
        ids[t.role].append(t.sample_ids)
    assert seen["train"] <= set(train_classes.tolist())
    assert seen["target"] <= set(target_classes.tolist())
    assert not seen["train"] & seen["target"]
    assert np.intersect1d(np.concatenate(ids["train"]), np.concatenate(ids["target"])).size == 0
    # A held-out class belongs wholly to the target side: 25 samples, enough for 5 + 15.
    assert all(t.sample_ids.size == 5 * 25 for t in tasks if t.role == "train")


def test_explicit_class_fraction(many_classes: ImageDataset) -> None:
    spec = TaskSpec(holdout_classes=0.5, target_nodes=2)
    train_classes, target_classes = split_classes(40, spec, 9)
    assert train_classes.size == target_classes.size == 20
    train_classes, target_classes = split_classes(40, TaskSpec(holdout_classes=0.0), 9)
    np.testing.assert_array_equal(train_classes, target_classes)
    assert split_classes(10, TaskSpec(), 0)[0].size == 10  # "auto" with 10 classes: none held out


# --------------------------------------------------------------------------- episodes


def test_episodes_are_well_formed(many_classes: ImageDataset) -> None:
    spec = TaskSpec(target_nodes=6)
    n = len(many_classes)
    for task in all_tasks(many_classes, spec):
        for ep in (task.episode(np.random.default_rng(task.partition_id)), task.fixed_episode()):
            assert ep.support_x.dtype == torch.float32 and ep.query_x.dtype == torch.float32
            assert ep.support_y.dtype == torch.int64 and ep.query_y.dtype == torch.int64
            assert ep.support_x.shape == (spec.ways * spec.shots, 1, 8, 8)
            assert ep.query_x.shape == (spec.ways * spec.queries, 1, 8, 8)
            assert torch.bincount(ep.support_y, minlength=spec.ways).tolist() == [spec.shots] * 5
            assert torch.bincount(ep.query_y, minlength=spec.ways).tolist() == [spec.queries] * 5
            support_rows, query_rows = row_of(ep.support_x, n), row_of(ep.query_x, n)
            assert np.intersect1d(support_rows, query_rows).size == 0
            assert set(support_rows) | set(query_rows) <= set(task.sample_ids.tolist())
            # Each image carries the node-local label of its class.
            classes = np.array(task.classes)
            np.testing.assert_array_equal(
                many_classes.labels[support_rows], classes[ep.support_y.numpy()]
            )
            np.testing.assert_array_equal(
                many_classes.labels[query_rows], classes[ep.query_y.numpy()]
            )


def test_training_episodes_vary_by_rng_and_repeat_by_seed(digits: ImageDataset) -> None:
    task = build_node_task(digits, TaskSpec(), 0, 0, NUM_PARTITIONS)
    assert task.role == "train"
    e1 = task.episode(np.random.default_rng((0, 1)))
    e2 = task.episode(np.random.default_rng((0, 2)))
    e1_again = task.episode(np.random.default_rng((0, 1)))
    assert not torch.equal(e1.support_x, e2.support_x)
    assert torch.equal(e1.support_x, e1_again.support_x)
    assert torch.equal(e1.query_x, e1_again.query_x)
    e1.support_x[0] = 0.0  # episode tensors are the caller's own memory
    assert task.images.flags.writeable is False


def test_target_fixed_episode_is_first_shots_then_rest(digits: ImageDataset) -> None:
    spec = TaskSpec()
    task = build_node_task(digits, spec, 0, NUM_PARTITIONS - 1, NUM_PARTITIONS)
    assert task.role == "target"
    ep = task.fixed_episode()
    for local in range(spec.ways):
        rows = np.flatnonzero(task.labels == local)
        np.testing.assert_array_equal(
            ep.support_x[ep.support_y == local].numpy(), task.images[rows[: spec.shots]]
        )
        np.testing.assert_array_equal(
            ep.query_x[ep.query_y == local].numpy(), task.images[rows[spec.shots :]]
        )


# --------------------------------------------------------------------------- deployed nodes


def test_task_from_site_data(digits: ImageDataset) -> None:
    spec = TaskSpec()
    train = task_from_site_data(digits, spec, 0, 3, "train")
    target = task_from_site_data(digits, spec, 0, 3, "target")
    check_task(train, digits)
    check_task(target, digits)
    assert train.sample_ids.size == 5 * 40 and target.sample_ids.size == 5 * 20
    again = task_from_site_data(digits, spec, 0, 3, "train")
    np.testing.assert_array_equal(train.sample_ids, again.sample_ids)
    with pytest.raises(DatasetError, match="role='val' must be one of train, target"):
        task_from_site_data(digits, spec, 0, 3, "val")


def test_site_with_too_few_classes(tmp_path: Path) -> None:
    x = np.zeros((60, 4, 4), np.uint8)
    y = np.array([0] * 25 + [1] * 25 + [2] * 10)
    np.savez(tmp_path / "site.npz", x=x, y=y)
    site = load_dataset("npz", str(tmp_path / "site.npz"))
    with pytest.raises(DatasetError, match=r"has 2 class\(es\) with at least .* lower task.ways"):
        task_from_site_data(site, TaskSpec(ways=3), 0, 0, "train")
    task = task_from_site_data(site, TaskSpec(ways=2), 0, 0, "target")
    assert set(task.classes) == {0, 1}


# --------------------------------------------------------------------------- configuration errors


def test_too_many_ways(digits: ImageDataset, many_classes: ImageDataset) -> None:
    with pytest.raises(DatasetError, match=r"task.ways=11 .* only use 10 .*; lower task.ways"):
        build_node_task(digits, TaskSpec(ways=11), 0, 0, NUM_PARTITIONS)
    spec = TaskSpec(holdout_classes=0.05, target_nodes=2)
    with pytest.raises(DatasetError, match=r"target nodes can only use 2 .*task.holdout_classes"):
        build_node_task(many_classes, spec, 0, 0, NUM_PARTITIONS)


def test_too_few_samples_in_training_pool(digits: ImageDataset) -> None:
    spec = TaskSpec(shots=60, queries=70, train_pool=130)
    with pytest.raises(
        DatasetError,
        match=r"class \d+ .* in the training pool, but an episode needs task.shots \+ "
        r"task.queries = 130 .*lower task.shots/task.queries or lower task.holdout_samples",
    ):
        build_node_task(digits, spec, 0, 0, NUM_PARTITIONS)


def test_too_few_samples_in_held_out_pool(digits: ImageDataset) -> None:
    spec = TaskSpec(holdout_samples=0.05)
    with pytest.raises(DatasetError, match=r"in the held-out pool.*raise task.holdout_samples"):
        build_node_task(digits, spec, 0, NUM_PARTITIONS - 1, NUM_PARTITIONS)
    # Training nodes fail the same way: the configuration is wrong for the whole federation.
    with pytest.raises(DatasetError, match="held-out pool"):
        build_node_task(digits, spec, 0, 0, NUM_PARTITIONS)
    # With no target nodes, no held-out pool is needed.
    assert build_node_task(digits, TaskSpec(holdout_samples=0.0, target_nodes=0), 0, 0, 5)


def test_bad_partitioning(digits: ImageDataset) -> None:
    with pytest.raises(DatasetError, match=r"target_nodes=10 leaves no training node .* lower"):
        build_node_task(digits, TaskSpec(target_nodes=10), 0, 0, 10)
    with pytest.raises(DatasetError, match=r"partition_id=20 is out of range.*ids 0..19"):
        build_node_task(digits, TaskSpec(), 0, 20, NUM_PARTITIONS)
    with pytest.raises(DatasetError, match=r"partition_id=-1 is out of range"):
        node_role(-1, NUM_PARTITIONS, TaskSpec())
    with pytest.raises(DatasetError, match="seed=-3"):
        build_node_task(digits, TaskSpec(), -3, 0, NUM_PARTITIONS)


def test_bad_spec() -> None:
    with pytest.raises(DatasetError, match=r"task.train_pool=10 .* raise task.train_pool or lower"):
        TaskSpec(train_pool=10)
    with pytest.raises(DatasetError, match=r"task.ways=1 must be an integer >= 2"):
        TaskSpec(ways=1)
    with pytest.raises(DatasetError, match=r"task.shots=0"):
        TaskSpec(shots=0)
    with pytest.raises(DatasetError, match=r"task.holdout_samples=1.0"):
        TaskSpec(holdout_samples=1.0)
    with pytest.raises(DatasetError, match=r"task.holdout_classes='some'"):
        TaskSpec(holdout_classes="some")
    with pytest.raises(DatasetError, match=r"task.holdout_classes=1.5"):
        TaskSpec(holdout_classes=1.5)
