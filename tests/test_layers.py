"""The architecture holds: import contracts, and every strategy name spelled in one place."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conf.choices import StrategyName

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("analysis", "benchmarks", "client", "conf", "gating", "server")


def test_import_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts: the layers, Flower-free core."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_each_strategy_name_is_spelled_in_one_place():
    sources = [ROOT / "simulate.py", *(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))]
    for name in StrategyName:
        literal = re.compile(rf"""["']{name.value}["']""")
        spelled = [p.relative_to(ROOT) for p in sources if literal.search(p.read_text())]
        assert spelled == [Path("conf/choices.py")], (name, spelled)
