#!/usr/bin/env python
"""Build a many-class few-shot imagefolder from the emoji artwork shipped in npm packages.

One class per emoji (keyed by its Unicode codepoint sequence), one image per drawing style that
has it: Google's Noto Emoji, Twitter's Twemoji and OpenMoji are three independently drawn
versions of the same ~1,900 emoji, so an N-way task asks which emoji a drawing in one style shows
after seeing it drawn in another. The result loads with ``dataset=imagefolder``::

    python simulate.py dataset=imagefolder dataset.path=/work/data/emoji dataset.image_size=32 \\
        task.ways=5 task.shots=1 task.queries=2

Prerequisites (once per machine)::

    apt-get install -y libcairo2 npm          # cairo rasterises OpenMoji's SVGs; npm fetches
    .venv/bin/pip install -e '.[datasets]'    # cairosvg (the optional 'datasets' dependencies)

Usage::

    python scripts/datasets/build_emoji.py /work/data/emoji              # npm-installs the pins
    python scripts/datasets/build_emoji.py /work/data/emoji --npm-dir DIR --size 64
    python scripts/datasets/build_emoji.py /work/data/emoji --force     # rebuild over a build

Without ``--npm-dir`` the script runs, into ``--cache`` (default ``~/.cache/metagater/emoji-npm``,
reused when it already holds these versions)::

    npm install --prefix <cache> --no-audit --no-fund emoji-datasource@16.0.0 \\
        emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0 openmoji@17.0.0

``--npm-dir`` takes such an install prefix (the folder holding ``node_modules/``) made by hand;
other versions than the pins are used with a warning, and the counts may then differ.

What it builds, and the decisions behind it:

- Classes: the top-level entries of ``emoji-datasource``'s ``emoji.json`` (Emoji 16.0: 1,911),
  which also gives each class its name, category and subcategory. Skin-tone variants are not
  classes (they are not top-level there: they would be near-copies of their base emoji); the
  'Component' category (the five skin-tone swatches, plain colour squares) is left out by default
  (``--exclude-category``, repeatable; ``--exclude-category Flags`` drops the 270 flags too).
- Styles: ``google`` and ``twitter`` from ``img/<style>/64/<unified>.png`` of
  ``emoji-datasource-google`` / ``-twitter`` (64x64 RGBA; the packages list no missing image for
  Emoji 16.0), ``openmoji`` from ``openmoji/color/svg/<HEXCODE>.svg``, rasterised to 64x64 with
  cairosvg. OpenMoji is matched by codepoint sequence ignoring U+FE0F (variation selector 16).
  Apple and Facebook artwork (also in emoji-datasource, 32px sheets only) is not used: it is not
  freely licensed. OpenMoji's ``black`` outline set is not a style of its own (same drawings).
- A class is kept when at least ``--min-styles`` styles have it (default 3, i.e. all three here:
  with these pins every emoji has all three). Every dropped emoji is listed in the summary.
- Every image is decoded and checked (64x64, opaque after compositing); a file that does not
  decode, has another size, or an SVG that does not render stops the build, naming the file.
- Transparent pixels are composited onto WHITE (OpenMoji draws black outlines, which would vanish
  on black; the imagefolder loader also composites transparency onto white), then the opaque RGB
  image is resized from 64 to ``--size`` (default 64, at most 64: the PNG sources are 64px) with
  Lanczos and written as ``<out>/<class>/<style>.png`` (8-bit RGB, no alpha), where ``<class>``
  is the lower-case codepoint sequence of emoji.json's ``unified`` field (e.g. ``1f600``,
  ``1f1ea-1f1ec``, ``0023-fe0f-20e3``).
- ``<out>/classes.json`` maps each class folder to its emoji, name, short name, category,
  subcategory and styles; ``<out>/build.json`` records the versions, settings and counts, and
  ``<out>/README.txt`` the artwork licences (Noto: Apache-2.0, Twemoji: CC BY 4.0, OpenMoji:
  CC BY-SA 4.0). The loader skips these non-image files at the root.
- The folder is built next to ``<out>`` and renamed into place at the end, so an interrupted
  build leaves no half-written dataset; an existing ``<out>`` is replaced only with ``--force``
  and only if it holds a ``build.json`` of an earlier build.

With the pins and the defaults: 1,906 classes (1,911 minus the 5 swatches; none dropped), each
drawn in all 3 styles: 5,718 images, 33 MB at 64px, built in about 20 s on 2 cores. With
``task.holdout_classes=auto`` and 5 ways, 1,429 classes go to training nodes and 477 to target
nodes (``gating.data.class_split`` lists them).

Protocols it supports: every class has at most 3 images (one per style), so N-way 1-shot with up
to 2 queries per class (``task.shots=1 task.queries=2``; ``task.train_pool`` is capped at the 3
images). The split must hold classes out (``task.holdout_classes=auto`` does, with >= 4 x ways
classes), since splitting 3 images per class between training and target nodes leaves too few on
each side. 5-way 3-shot is impossible: it needs 3 support + at least 1 query = 4 images per class;
even with a fourth style it would be possible only with exactly 1 query per class.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

#: Exact versions this script was checked against (counts in the docstring are for these).
PINS: dict[str, str] = {
    "emoji-datasource": "16.0.0",
    "emoji-datasource-google": "16.0.0",
    "emoji-datasource-twitter": "16.0.0",
    "openmoji": "17.0.0",
}
STYLES: tuple[str, ...] = ("google", "twitter", "openmoji")
SOURCE_SIZE = 64  # side of the datasource PNGs; OpenMoji is rasterised at the same size
BACKGROUND = (255, 255, 255)
DEFAULT_CACHE = Path("~/.cache/metagater/emoji-npm")
VS16 = "fe0f"
LICENCES = {
    "google": "Noto Emoji (Google), Apache License 2.0, https://github.com/googlefonts/noto-emoji",
    "twitter": "Twemoji (Twitter / jdecked fork), CC BY 4.0, https://github.com/jdecked/twemoji",
    "openmoji": "OpenMoji, CC BY-SA 4.0, https://openmoji.org/ (all emojis designed by OpenMoji)",
}


class BuildError(RuntimeError):
    """The inputs are missing or not what the build expects; the message says what to do."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Build an emoji imagefolder (one class per emoji, one image per style).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for the prerequisites and the decisions.",
    )
    parser.add_argument("out", type=Path, help="output folder, e.g. /work/data/emoji")
    parser.add_argument(
        "--npm-dir",
        type=Path,
        help="an npm install prefix holding node_modules/ with the four packages "
        "(default: npm-install the pinned versions into --cache)",
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="npm prefix to use")
    parser.add_argument("--size", type=int, default=SOURCE_SIZE, help="image side, 8..64")
    parser.add_argument(
        "--min-styles", type=int, default=3, help="keep emoji drawn in at least this many styles"
    )
    parser.add_argument(
        "--exclude-category",
        action="append",
        default=None,
        help="emoji.json category to leave out (repeatable; default: Component)",
    )
    parser.add_argument("--force", action="store_true", help="replace an earlier build in OUT")
    args = parser.parse_args(argv)
    try:
        build(
            out=args.out.expanduser().resolve(),
            npm_dir=None if args.npm_dir is None else args.npm_dir.expanduser().resolve(),
            cache=args.cache.expanduser().resolve(),
            size=args.size,
            min_styles=args.min_styles,
            exclude=("Component",) if args.exclude_category is None else args.exclude_category,
            force=args.force,
        )
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- npm packages


def installed_versions(prefix: Path) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for package in PINS:
        meta = prefix / "node_modules" / package / "package.json"
        found[package] = json.loads(meta.read_text())["version"] if meta.is_file() else None
    return found


def npm_install(prefix: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(
            "npm is not installed: `apt-get install -y npm`, or install the packages elsewhere "
            "and pass --npm-dir"
        )
    prefix.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}@{version}" for name, version in PINS.items()]
    command = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", *specs]
    print("running:", " ".join(command), flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise BuildError(f"npm install failed (exit status {result.returncode})")


def packages(npm_dir: Path | None, cache: Path) -> tuple[Path, dict[str, str]]:
    """The node_modules folder to read and the versions it holds."""
    if npm_dir is None:
        if installed_versions(cache) != PINS:
            npm_install(cache)
        prefix = cache
    else:
        prefix = npm_dir
    versions = installed_versions(prefix)
    missing = [name for name, version in versions.items() if version is None]
    if missing:
        raise BuildError(
            f"{prefix / 'node_modules'} lacks {', '.join(missing)}; run `npm install --prefix "
            f"{prefix} " + " ".join(f"{n}@{v}" for n, v in PINS.items()) + "`"
        )
    for name, version in versions.items():
        if version != PINS[name]:
            print(
                f"warning: {name} {version} is not the pinned {PINS[name]}; counts may differ",
                file=sys.stderr,
            )
    return prefix / "node_modules", {k: str(v) for k, v in versions.items()}


# --------------------------------------------------------------------------- images


def sequence_key(codepoints: str) -> str:
    """'1F3F3-FE0F-200D-1F308' -> '1f3f3-200d-1f308': the match key, ignoring VS16."""
    return "-".join(p for p in codepoints.lower().split("-") if p != VS16)


def flatten(image, size: int):  # PIL.Image.Image -> PIL.Image.Image
    """RGBA at SOURCE_SIZE -> opaque RGB on the background, resized to ``size``."""
    from PIL import Image

    rgba = image.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    rgb = Image.alpha_composite(canvas, rgba).convert("RGB")
    if size != rgb.width:
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return rgb


def read_png(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.size != (SOURCE_SIZE, SOURCE_SIZE):
                raise BuildError(
                    f"{path} is {image.width}x{image.height}, expected "
                    f"{SOURCE_SIZE}x{SOURCE_SIZE}: is this the right package version?"
                )
            return image.convert("RGBA")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise BuildError(f"cannot decode {path}: {exc}; reinstall the package") from exc


def render_svg(path: Path):
    try:
        import cairosvg
    except (ImportError, OSError) as exc:  # OSError: cairocffi finds no libcairo
        raise BuildError(
            f"cannot import cairosvg ({exc}); install it with `pip install -e '.[datasets]'` and "
            "Debian's cairo with `apt-get install -y libcairo2`"
        ) from exc
    from PIL import Image

    try:
        png = cairosvg.svg2png(
            url=str(path), output_width=SOURCE_SIZE, output_height=SOURCE_SIZE, unsafe=False
        )
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            if image.size != (SOURCE_SIZE, SOURCE_SIZE):
                raise BuildError(f"{path} rendered at {image.size}, expected a square SVG")
            return image.convert("RGBA")
    except BuildError:
        raise
    except Exception as exc:  # cairosvg raises many kinds (XML, parse, value errors)
        raise BuildError(f"cannot render {path}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- build


def build(
    out: Path,
    npm_dir: Path | None,
    cache: Path,
    size: int,
    min_styles: int,
    exclude: tuple[str, ...] | list[str],
    force: bool,
) -> None:
    started = time.perf_counter()
    if not 8 <= size <= SOURCE_SIZE:
        raise BuildError(f"--size={size} must be in 8..{SOURCE_SIZE} (the sources are 64px)")
    if not 1 <= min_styles <= len(STYLES):
        raise BuildError(f"--min-styles={min_styles} must be in 1..{len(STYLES)}")
    if out.exists() and not force:
        raise BuildError(f"{out} exists; pass --force to replace an earlier build")
    if out.exists() and not (out / "build.json").is_file():
        raise BuildError(f"{out} exists and holds no build.json of this script: not replacing it")

    modules, versions = packages(npm_dir, cache)
    emoji = json.loads((modules / "emoji-datasource" / "emoji.json").read_text())
    categories = Counter(e["category"] for e in emoji)
    unknown = [c for c in exclude if c not in categories]
    if unknown:
        raise BuildError(
            f"unknown --exclude-category {', '.join(unknown)}; emoji.json has "
            f"{', '.join(sorted(categories))}"
        )

    # Which style has which emoji.
    png_dirs = {
        "google": modules / "emoji-datasource-google" / "img" / "google" / str(SOURCE_SIZE),
        "twitter": modules / "emoji-datasource-twitter" / "img" / "twitter" / str(SOURCE_SIZE),
    }
    svg_dir = modules / "openmoji" / "color" / "svg"
    for folder in (*png_dirs.values(), svg_dir):
        if not folder.is_dir():
            raise BuildError(f"{folder} does not exist: is the package version right?")
    files_per_style = {
        style: sorted(p.name for p in d.glob("*.png")) for style, d in png_dirs.items()
    }
    svgs: dict[str, Path] = {}
    for svg in sorted(svg_dir.glob("*.svg")):
        key = sequence_key(svg.stem)
        if key in svgs:
            raise BuildError(f"{svg} and {svgs[key]} are the same emoji up to U+FE0F")
        svgs[key] = svg
    available = {style: len(names) for style, names in files_per_style.items()}
    available["openmoji"] = len(svgs)

    sources: dict[str, dict[str, Path]] = {}  # class -> style -> file
    meta: dict[str, dict[str, object]] = {}
    dropped: list[tuple[str, str, int]] = []
    excluded = Counter()
    for entry in sorted(emoji, key=lambda e: e["sort_order"]):
        folder = entry["unified"].lower()
        if entry["category"] in exclude:
            excluded[entry["category"]] += 1
            continue
        found: dict[str, Path] = {}
        for style, directory in png_dirs.items():
            path = directory / entry["image"]
            listed = bool(entry.get(f"has_img_{style}"))
            if listed and not path.is_file():
                raise BuildError(f"emoji.json lists {style} art for {folder} but {path} is missing")
            if listed:
                found[style] = path
        svg = svgs.get(sequence_key(entry["unified"]))
        if svg is None and entry.get("non_qualified"):
            svg = svgs.get(sequence_key(entry["non_qualified"]))
        if svg is not None:
            found["openmoji"] = svg
        if len(found) < min_styles:
            dropped.append((folder, entry["name"] or entry["short_name"], len(found)))
            continue
        sources[folder] = found
        meta[folder] = {
            "emoji": "".join(chr(int(cp, 16)) for cp in entry["unified"].split("-")),
            "name": entry["name"] or entry["short_name"],
            "short_name": entry["short_name"],
            "category": entry["category"],
            "subcategory": entry["subcategory"],
            "styles": [s for s in STYLES if s in found],
        }
    if not sources:
        raise BuildError(f"no emoji is drawn in {min_styles} styles; lower --min-styles")

    # Render into a sibling folder, rename into place when everything is written.
    staging = out.with_name(f".{out.name}.building")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    used = Counter()
    total = len(sources)
    for i, (folder, found) in enumerate(sources.items(), 1):
        target = staging / folder
        target.mkdir()
        for style, path in found.items():
            art = render_svg(path) if style == "openmoji" else read_png(path)
            rgb = flatten(art, size)
            rgb.save(target / f"{style}.png", optimize=True)
            used[style] += 1
        if i % 250 == 0 or i == total:
            print(f"  {i}/{total} classes written", flush=True)

    per_class = Counter(len(found) for found in sources.values())
    summary = {
        "versions": versions,
        "size": size,
        "background": list(BACKGROUND),
        "min_styles": min_styles,
        "excluded_categories": {c: excluded[c] for c in exclude},
        "styles_available": available,
        "images_per_style": {s: used[s] for s in STYLES},
        "classes": total,
        "images": sum(used.values()),
        "classes_by_images": {str(k): per_class[k] for k in sorted(per_class)},
        "classes_by_category": dict(Counter(m["category"] for m in meta.values()).most_common()),
        "dropped": [{"class": f, "name": n, "styles": k} for f, n, k in dropped],
    }
    (staging / "classes.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    (staging / "build.json").write_text(json.dumps(summary, indent=1) + "\n")
    (staging / "README.txt").write_text(
        "Emoji imagefolder built by scripts/datasets/build_emoji.py (MetaGater on Flower).\n"
        "One folder per emoji (its codepoint sequence), one PNG per drawing style.\n\n"
        "Artwork licences:\n" + "".join(f"- {s}: {LICENCES[s]}\n" for s in STYLES)
    )
    # Check what was written decodes, then swap it in.
    check_output(staging, sources, size)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)

    print(f"\nemoji imagefolder: {out}")
    print("  packages: " + ", ".join(f"{k}@{v}" for k, v in versions.items()))
    print(f"  styles available: {available}")
    print(f"  excluded categories: {summary['excluded_categories']}")
    print(f"  classes: {total} (kept with >= {min_styles} styles), dropped: {len(dropped)}")
    for f, n, k in dropped[:20]:
        print(f"    dropped {f} ({n}): {k} style(s)")
    print(f"  images: {summary['images']} {dict(summary['images_per_style'])}")
    print(f"  images per class: {summary['classes_by_images']}")
    print(f"  classes per category: {summary['classes_by_category']}")
    print(f"  {size}x{size} RGB on white, {time.perf_counter() - started:.0f} s")


def check_output(root: Path, sources: dict[str, dict[str, Path]], size: int) -> None:
    from PIL import Image

    for folder, found in sources.items():
        for style in found:
            path = root / folder / f"{style}.png"
            with Image.open(path) as image:
                image.load()
                if image.mode != "RGB" or image.size != (size, size):
                    raise BuildError(f"{path} came out {image.mode} {image.size}")


if __name__ == "__main__":
    sys.exit(main())
