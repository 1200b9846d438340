"""Node tasks: the federated split of a dataset into one N-way classification task per node.

Every node is an N-way task with node-local labels 0..N-1 in a node-specific class order. The split
is a pure function of (dataset, seed, partition_id, num_partitions, spec): each random choice uses
its own ``np.random.default_rng`` seeded with a tuple of those values and a salt (never global RNG
state), so a node in a Ray worker, a real deployed node and a test all see the same task.

Training nodes and target nodes never share samples: per class, a fixed (seed-only) shuffle
reserves the first ``holdout_samples`` fraction for target nodes. With many classes (Omniglot) a
fraction of the classes is held out too; such a class then belongs wholly to the target side and
every other class wholly to the training side, so the sides are disjoint in classes and samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gating.data.datasets import DatasetError, ImageDataset

__all__ = [
    "Episode",
    "NodeTask",
    "TaskSpec",
    "build_node_task",
    "node_role",
    "split_classes",
    "task_from_site_data",
]

ROLES: tuple[str, ...] = ("train", "target")

# Salts keep the independent random streams apart even when they share (seed, partition_id).
_SALT_CLASS_SPLIT = 0x0C1A55
_SALT_SAMPLE_SPLIT = 0x5A4D
_SALT_NODE = 0x40DE
_SALT_SITE = 0x517E


@dataclass(frozen=True)
class TaskSpec:
    """Shape of every node's task and how the dataset is shared out; see the module docstring."""

    ways: int = 5
    shots: int = 5  # K support samples per class
    queries: int = 15  # query samples per class
    # Samples per class a TRAINING node holds; each round it draws a fresh support/query episode
    # from them. Capped at what the class's training pool has; must be >= shots + queries.
    train_pool: int = 40
    target_nodes: int = 10  # the LAST `target_nodes` partitions are target nodes
    holdout_samples: float = 0.3  # fraction of each shared class's samples kept for target nodes
    # Fraction of classes reserved for target nodes; "auto" = 0.25 when the dataset has
    # >= 4 * ways classes (e.g. Omniglot), else 0 (digits, Fashion-MNIST: 10 classes).
    holdout_classes: str | float = "auto"

    def __post_init__(self) -> None:
        _check_int("task.ways", self.ways, 2, "a task needs at least 2 classes")
        _check_int("task.shots", self.shots, 1, "each class needs a support sample")
        _check_int("task.queries", self.queries, 1, "each class needs a query sample")
        _check_int("task.target_nodes", self.target_nodes, 0, "it counts partitions")
        _check_int("task.train_pool", self.train_pool, 1, "it counts samples")
        if self.train_pool < self.shots + self.queries:
            raise DatasetError(
                f"task.train_pool={self.train_pool} is smaller than task.shots + task.queries = "
                f"{self.shots + self.queries}: a training node could not draw an episode; raise "
                "task.train_pool or lower task.shots/task.queries"
            )
        if not isinstance(self.holdout_samples, int | float) or not (
            0.0 <= float(self.holdout_samples) < 1.0
        ):
            raise DatasetError(
                f"task.holdout_samples={self.holdout_samples!r} must be a fraction in [0, 1)"
            )
        hc = self.holdout_classes
        if isinstance(hc, str):
            if hc != "auto":
                raise DatasetError(
                    f"task.holdout_classes={hc!r} must be 'auto' or a fraction in [0, 1)"
                )
        elif isinstance(hc, bool) or not isinstance(hc, int | float) or not 0.0 <= hc < 1.0:
            raise DatasetError(
                f"task.holdout_classes={hc!r} must be 'auto' or a fraction in [0, 1)"
            )

    @property
    def samples_per_class(self) -> int:
        """Samples one episode uses per class (support + query)."""
        return self.shots + self.queries

    def holdout_class_fraction(self, num_classes: int) -> float:
        """Resolve "auto": hold classes out only when there are plenty (>= 4 * ways)."""
        if self.holdout_classes == "auto":
            return 0.25 if num_classes >= 4 * self.ways else 0.0
        return float(self.holdout_classes)


def _check_int(name: str, value: object, minimum: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DatasetError(f"{name}={value!r} must be an integer >= {minimum} ({why})")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise DatasetError(f"seed={seed!r} must be a non-negative integer")


@dataclass(frozen=True, eq=False)
class Episode:
    """One support/query draw: float32 images (n, C, H, W) and int64 node-local labels (n,)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


@dataclass(frozen=True, eq=False)
class NodeTask:
    """One node's N-way task and its private samples, grouped by node-local label.

    ``sample_ids`` are the rows of the source dataset behind ``images``: they make the split
    checkable (training vs target disjointness) and debuggable. ``eq=False``: identity equality,
    since element-wise array comparison is ambiguous; compare ``classes``/``sample_ids`` instead.
    """

    partition_id: int
    role: str  # "train" or "target"
    classes: tuple[int, ...]  # global class ids; position i = node-local label i
    images: np.ndarray  # (n, C, H, W) float32, this node's private samples (read-only)
    labels: np.ndarray  # (n,) int64 node-local labels 0..ways-1 (read-only)
    spec: TaskSpec
    sample_ids: np.ndarray  # (n,) int64 rows of the source dataset, same order as images

    @property
    def ways(self) -> int:
        return len(self.classes)

    def episode(self, rng: np.random.Generator | None = None) -> Episode:
        """Draw ``shots`` support and ``queries`` query samples per class, disjoint.

        Training nodes pass a fresh, seeded rng every round so each round sees a new episode; with
        ``rng=None`` the draw uses fresh OS entropy and is not reproducible.
        """
        rng = np.random.default_rng() if rng is None else rng
        shots, queries = self.spec.shots, self.spec.queries
        support, query = [], []
        for local in range(self.ways):
            idx = rng.permutation(np.flatnonzero(self.labels == local))
            support.append(idx[:shots])
            query.append(idx[shots : shots + queries])
        return self._make_episode(np.concatenate(support), np.concatenate(query))

    def fixed_episode(self) -> Episode:
        """The deterministic episode: per class the first ``shots`` samples are support, the next
        ``queries`` query. Target nodes always evaluate on exactly this."""
        shots, queries = self.spec.shots, self.spec.queries
        support, query = [], []
        for local in range(self.ways):
            idx = np.flatnonzero(self.labels == local)
            support.append(idx[:shots])
            query.append(idx[shots : shots + queries])
        return self._make_episode(np.concatenate(support), np.concatenate(query))

    def _make_episode(self, support: np.ndarray, query: np.ndarray) -> Episode:
        # Fancy indexing copies, so the tensors own writable memory (no read-only torch views).
        return Episode(
            support_x=torch.from_numpy(self.images[support].astype(np.float32, copy=False)),
            support_y=torch.from_numpy(self.labels[support].astype(np.int64, copy=False)),
            query_x=torch.from_numpy(self.images[query].astype(np.float32, copy=False)),
            query_y=torch.from_numpy(self.labels[query].astype(np.int64, copy=False)),
        )


def split_classes(
    dataset_num_classes: int, spec: TaskSpec, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train_classes, target_classes), sorted global ids; equal arrays when none are held out.

    Depends on the seed only, so every node agrees on which classes are held out.
    """
    _check_seed(seed)
    n = int(dataset_num_classes)
    if n < 1:
        raise DatasetError(f"the dataset has {n} classes; it needs at least task.ways={spec.ways}")
    n_target = math.floor(spec.holdout_class_fraction(n) * n + 0.5)
    everything = np.arange(n, dtype=np.int64)
    if n_target == 0:
        return everything, everything.copy()
    order = np.random.default_rng((seed, _SALT_CLASS_SPLIT)).permutation(n)
    return np.sort(order[n_target:]), np.sort(order[:n_target])


def node_role(partition_id: int, num_partitions: int, spec: TaskSpec) -> str:
    """Role of a partition: the last ``spec.target_nodes`` are "target", the rest "train"."""
    _check_int("num_partitions", num_partitions, 1, "it counts nodes")
    if spec.target_nodes >= num_partitions:
        raise DatasetError(
            f"task.target_nodes={spec.target_nodes} leaves no training node among "
            f"{num_partitions} partitions; lower task.target_nodes below the number of nodes"
        )
    if (
        isinstance(partition_id, bool)
        or not isinstance(partition_id, int | np.integer)
        or not 0 <= partition_id < num_partitions
    ):
        raise DatasetError(
            f"partition_id={partition_id!r} is out of range: there are {num_partitions} "
            f"partitions, ids 0..{num_partitions - 1}"
        )
    return "target" if partition_id >= num_partitions - spec.target_nodes else "train"


def build_node_task(
    dataset: ImageDataset, spec: TaskSpec, seed: int, partition_id: int, num_partitions: int
) -> NodeTask:
    """The task of simulated node ``partition_id`` out of ``num_partitions``.

    A node picks ``spec.ways`` classes at random from its role's classes, in a random order that
    defines its local labels. A training node takes ``train_pool`` samples per class (or the whole
    training pool of the class if smaller) from the training pool; training nodes may share
    samples with each other, just never with target nodes. A target node takes
    ``shots + queries`` per class from the held-out pool (target nodes may share samples too).
    """
    _check_seed(seed)
    role = node_role(partition_id, num_partitions, spec)
    train_classes, target_classes = split_classes(dataset.num_classes, spec, seed)
    held_out_classes = not np.array_equal(train_classes, target_classes)
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)

    # Check both sides on every node, so a bad configuration fails the same way everywhere.
    sides = [("train", train_classes)] + ([("target", target_classes)] if spec.target_nodes else [])
    for side, classes in sides:
        _check_enough_classes(dataset, spec, side, classes, held_out_classes)
        pool = _pool_sizes(counts[classes], spec, side, held_out_classes)
        short = np.flatnonzero(pool < spec.samples_per_class)
        if short.size:
            c = int(classes[short[0]])
            which = "training" if side == "train" else "held-out"
            fix = "lower task.shots/task.queries"
            if not held_out_classes:
                fix += f" or {'lower' if side == 'train' else 'raise'} task.holdout_samples"
            raise DatasetError(
                f"class {c} ({dataset.class_names[c]!r}) of dataset {dataset.name!r} has "
                f"{int(counts[c])} samples, {int(pool[short[0]])} of them in the {which} pool, "
                f"but an episode needs task.shots + task.queries = {spec.samples_per_class} "
                f"({short.size} class(es) are short); {fix}"
            )

    eligible = train_classes if role == "train" else target_classes
    per_class = spec.train_pool if role == "train" else spec.samples_per_class
    rng = np.random.default_rng((seed, partition_id, _SALT_NODE))
    classes = rng.choice(eligible, size=spec.ways, replace=False)
    ids = []
    for c in classes:
        pool = _class_pool(dataset.labels, int(c), spec, seed, role, held_out_classes)
        take = min(per_class, pool.size)
        ids.append(rng.choice(pool, size=take, replace=False))
    return _make_task(dataset, spec, partition_id, role, classes, ids)


def task_from_site_data(
    dataset: ImageDataset, spec: TaskSpec, seed: int, partition_id: int, role: str
) -> NodeTask:
    """The task of a deployed node whose ``dataset`` is its own local data.

    It picks ``spec.ways`` classes at random among the classes it has at least
    ``shots + queries`` samples of, and keeps all its samples of them, capped at ``train_pool``
    per class for a training node and ``shots + queries`` for a target node. No hold-out applies:
    the data never leaves the site, so there is nothing to keep disjoint here.
    """
    _check_seed(seed)
    if role not in ROLES:
        raise DatasetError(f"role={role!r} must be one of {', '.join(ROLES)}")
    _check_int("partition_id", partition_id, 0, "it numbers nodes")
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    eligible = np.flatnonzero(counts >= spec.samples_per_class)
    if eligible.size < spec.ways:
        raise DatasetError(
            f"this node's dataset {dataset.name!r} has {eligible.size} class(es) with at least "
            f"task.shots + task.queries = {spec.samples_per_class} samples (per-class counts: "
            f"{counts.tolist()}), but task.ways={spec.ways}; lower task.ways or "
            "task.shots/task.queries, or add data"
        )
    per_class = spec.train_pool if role == "train" else spec.samples_per_class
    rng = np.random.default_rng((seed, partition_id, _SALT_SITE))
    classes = rng.choice(eligible, size=spec.ways, replace=False)
    ids = []
    for c in classes:
        pool = np.flatnonzero(dataset.labels == c)
        ids.append(rng.choice(pool, size=min(per_class, pool.size), replace=False))
    return _make_task(dataset, spec, partition_id, role, classes, ids)


# --------------------------------------------------------------------------- helpers


def _check_enough_classes(
    dataset: ImageDataset, spec: TaskSpec, side: str, classes: np.ndarray, held_out: bool
) -> None:
    if classes.size >= spec.ways:
        return
    who = "training" if side == "train" else "target"
    detail = (
        f", {dataset.num_classes - classes.size} being held out for the other side"
        if held_out
        else ""
    )
    fix = "lower task.ways" + (" or change task.holdout_classes" if held_out else "")
    raise DatasetError(
        f"task.ways={spec.ways} but {who} nodes can only use {classes.size} of the "
        f"{dataset.num_classes} classes of dataset {dataset.name!r}{detail}; {fix}"
    )


def _holdout_count(n: int, spec: TaskSpec, held_out_classes: bool, side_of_class: str) -> int:
    """How many of a class's ``n`` shuffled samples (taken first) belong to target nodes."""
    if held_out_classes:  # the class belongs wholly to one side
        return n if side_of_class == "target" else 0
    return math.floor(spec.holdout_samples * n + 0.5)


def _pool_sizes(counts: np.ndarray, spec: TaskSpec, side: str, held_out: bool) -> np.ndarray:
    hold = np.array([_holdout_count(int(n), spec, held_out, side) for n in counts], dtype=np.int64)
    return hold if side == "target" else counts - hold


def _class_pool(
    labels: np.ndarray, c: int, spec: TaskSpec, seed: int, side: str, held_out: bool
) -> np.ndarray:
    """Dataset rows of class ``c`` in ``side``'s pool; the shuffle depends on (seed, c) only."""
    rows = np.random.default_rng((seed, _SALT_SAMPLE_SPLIT, c)).permutation(
        np.flatnonzero(labels == c)
    )
    n_hold = _holdout_count(rows.size, spec, held_out, side)
    return rows[:n_hold] if side == "target" else rows[n_hold:]


def _make_task(
    dataset: ImageDataset,
    spec: TaskSpec,
    partition_id: int,
    role: str,
    classes: np.ndarray,
    ids: list[np.ndarray],
) -> NodeTask:
    sample_ids = np.concatenate(ids).astype(np.int64)
    labels = np.concatenate([np.full(len(i), k, dtype=np.int64) for k, i in enumerate(ids)])
    images = np.ascontiguousarray(dataset.images[sample_ids], dtype=np.float32)
    for arr in (sample_ids, labels, images):
        arr.flags.writeable = False
    return NodeTask(
        partition_id=int(partition_id),
        role=role,
        classes=tuple(int(c) for c in classes),
        images=images,
        labels=labels,
        spec=spec,
        sample_ids=sample_ids,
    )
