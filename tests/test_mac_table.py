"""`python -m gating.mac_table` as a user runs it: an expected failure is one line, no trace."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def mac_table(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gating.mac_table", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_a_missing_dataset_is_one_error_line_naming_the_path(tmp_path, subprocess_env, dataset):
    missing = tmp_path / "no-such-folder"
    done = mac_table(subprocess_env, "--dataset", dataset, "--path", str(missing))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ") and str(missing) in lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--batch", "0", "--dataset", "digits"], "--batch"),
        (["--width", "zero"], "--width"),
        (["--no-such-option"], "--no-such-option"),
        (["--dataset", "no_such_dataset"], "no_such_dataset"),
    ],
)
def test_a_bad_argument_is_one_error_line(subprocess_env, args, named):
    done = mac_table(subprocess_env, *args)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and named in lines[0], done.stderr


def test_the_table_on_real_images(subprocess_env):
    done = mac_table(subprocess_env, "--dataset", "digits", "--batch", "8")
    assert done.returncode == 0, done.stderr
    assert "realized on 8 digits images" in done.stdout
    assert "total" in done.stdout
