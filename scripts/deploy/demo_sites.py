"""Write demo site data: the embedded digits split into disjoint per-site ``.npz`` files.

    python scripts/deploy/demo_sites.py OUT_DIR [--train-sites 1] [--target-sites 1]

A real site has its own files; this gives a first deployment something to load (one file per
SuperNode: ``train-1.npz``, ..., ``target-1.npz``, ...), in the generic ``.npz`` format a site can
also write from its own images: ``x`` uint8 (N, H, W), ``y`` (N,) labels.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from gating.data import load_dataset


def write_sites(out_dir: Path, train_sites: int, target_sites: int, seed: int = 0) -> list[Path]:
    """Split the digits into ``train_sites + target_sites`` disjoint files; returns their paths."""
    digits = load_dataset("digits")
    images = np.rint(digits.images[:, 0] * 255).astype(np.uint8)
    order = np.random.default_rng(seed).permutation(len(digits))
    names = [f"train-{i + 1}" for i in range(train_sites)]
    names += [f"target-{i + 1}" for i in range(target_sites)]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip(names, np.array_split(order, len(names)), strict=True):
        path = out_dir / f"{name}.npz"
        np.savez(path, x=images[rows], y=digits.labels[rows])
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train-sites", type=int, default=1)
    parser.add_argument("--target-sites", type=int, default=1)
    args = parser.parse_args()
    if args.train_sites < 1 or args.target_sites < 1:
        parser.error("a federation needs at least one training and one target site")
    for path in write_sites(args.out_dir, args.train_sites, args.target_sites):
        print(f"{path}  ({len(np.load(path)['y'])} images)")


if __name__ == "__main__":
    main()
