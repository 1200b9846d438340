#!/usr/bin/env bash
# Run one benchmark protocol: every strategy, and MetaGater at several target ratios, one run
# each, sequentially (each run already uses both cores through its Ray actors). Then report.
#   benchmarks/run_protocol.sh fmnist_5w5s outputs/bench/fmnist_5w5s [extra overrides...]
# Runs that already have a summary.json are kept (re-running the script only fills the gaps).
set -uo pipefail
protocol=$1; out=$2; shift 2
python=${PYTHON:-.venv/bin/python}
cd "$(dirname "$0")/.."
mkdir -p "$out"
run() {  # name, overrides...
    local name=$1; shift
    [ -f "$out/$name/summary.json" ] && { echo "skip $name (done)"; return; }
    rm -rf "$out/$name"
    echo "=== $name: $*"
    "$python" simulate.py +benchmark="$protocol" "$@" "${EXTRA[@]}" hydra.run.dir="$out/$name" \
        > "$out/$name.log" 2>&1 || echo "FAILED: $name (see $out/$name.log)"
    grep -h "results in" "$out/$name.log" | sed 's/.*results in/   /'
}
EXTRA=("$@")
run metagater_r0.5 strategy=metagater gating.target_ratio=0.5
run fedmeta strategy=fedmeta
run fedavg strategy=fedavg
run perfedavg_hf strategy=perfedavg
run metagater_r0.3 strategy=metagater gating.target_ratio=0.3
run metagater_r0.7 strategy=metagater gating.target_ratio=0.7
run metagater_r1.0 strategy=metagater gating.target_ratio=1.0
run metagater_fo strategy=metagater_fo gating.target_ratio=0.5
run perfedavg_fo strategy=perfedavg meta.first_order=true
"$python" -m analysis.report "$out" --out "$out"
