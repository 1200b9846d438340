"""The architecture holds: import contracts, and a strategy is one module plus one YAML."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conf.choices import StrategyName
from gating.federated.strategies import strategy_named

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("analysis", "benchmarks", "client", "conf", "gating", "server")


def test_import_contracts_hold():
    """pyproject.toml's [tool.importlinter] contracts: the layers, Flower-free core."""
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_strategy_is_its_module_and_its_yaml():
    """Each name: a YAML in conf/strategy/, a module in gating/federated/strategies/ whose
    record carries that name, and the name spelled nowhere else in the code."""
    modules = {
        p.stem for p in (ROOT / "gating/federated/strategies").glob("*.py") if p.stem != "__init__"
    }
    assert {name.value for name in StrategyName} == modules
    sources = [ROOT / "simulate.py", *(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))]
    for name in StrategyName:
        assert strategy_named(name).name == name
        literal = re.compile(rf"""["']{name.value}["']""")
        spelled = [p.relative_to(ROOT) for p in sources if literal.search(p.read_text())]
        assert spelled == [Path(f"gating/federated/strategies/{name.value}.py")], (name, spelled)
