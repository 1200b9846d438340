"""Apply a proposed Flower patch (``docs/patches/*.patch``) to this process only.

A benchmark that measures a proposed change to Flower should run exactly the patch a
maintainer would read, not a re-implementation of it. This copies the files the patch touches
out of the installed Flower, applies the patch to the copies with ``patch``, imports them under
private names and installs the functions and methods that differ into Flower's modules and
classes. Flower on disk stays untouched.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

import flwr

SITE = Path(flwr.__file__).resolve().parents[1]


def patched_copies(patch: Path, folder: Path) -> dict[str, Path]:
    """The touched files (by path relative to site-packages), copied under ``folder`` and
    patched; a clear error if the patch does not apply."""
    text = patch.read_text()
    paths = re.findall(r"^\+\+\+ b/(\S+)", text, flags=re.MULTILINE)
    if not paths:
        raise ValueError(f"{patch} names no file to patch")
    for relative in paths:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(SITE / relative, folder / relative)
    done = subprocess.run(
        ["patch", "-p1", "-d", str(folder), "--forward", "--batch"],
        input=text,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"{patch.name} does not apply to Flower {flwr.__version__}:\n{done.stdout}"
        )
    return {relative: folder / relative for relative in paths}


def module_name(relative: str) -> str:
    return relative.removesuffix(".py").replace("/", ".")


def load_copy(path: Path, name: str) -> ModuleType:
    # a sibling of the original, so the copy's relative imports find Flower's own modules
    package, _, leaf = name.rpartition(".")
    spec = importlib.util.spec_from_file_location(f"{package}._patched_{leaf}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install(patched: ModuleType, original: ModuleType) -> list[str]:
    """Every module-level function and class method of ``patched`` whose source differs from
    (or is missing in) ``original``, set on ``original``; the names installed. The functions
    keep the copy's globals: what they import is Flower's own (same classes, same state)."""
    installed = []
    for name, value in vars(patched).items():
        if inspect.isfunction(value) and value.__module__ == patched.__name__:
            if not _same_source(value, getattr(original, name, None)):
                setattr(original, name, value)
                installed.append(name)
        elif inspect.isclass(value) and value.__module__ == patched.__name__:
            target = getattr(original, name)
            for attr, method in vars(value).items():
                if inspect.isfunction(method) and not _same_source(method, vars(target).get(attr)):
                    setattr(target, attr, method)
                    installed.append(f"{name}.{attr}")
    return installed


def _same_source(a: object, b: object) -> bool:
    if b is None:
        return False
    try:
        return inspect.getsource(a) == inspect.getsource(b)  # type: ignore[arg-type]
    except OSError:  # generated (a dataclass's __init__): not the patch's
        return True


def apply(patch: Path) -> list[str]:
    """Apply ``patch`` to this process's Flower; the functions and methods it replaced."""
    installed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="flwr-patch-") as folder:
        for relative, path in patched_copies(patch, Path(folder)).items():
            name = module_name(relative)
            original = importlib.import_module(name)
            installed += [f"{name}.{n}" for n in install(load_copy(path, name), original)]
    return installed
