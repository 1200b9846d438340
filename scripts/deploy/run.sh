#!/usr/bin/env bash
# Run MetaGater on a deployed federation and fail unless the run really completed.
#
#   scripts/deploy/run.sh CONNECTION [flwr run options, e.g. --run-config "federation.rounds=50"]
#
# `flwr run --stream` exits 0 even when the ServerApp crashed, so this streams the run's log,
# then reads the run's final status from the SuperLink (`flwr ls --run-id ID CONNECTION`) and
# exits 0 only for finished:completed (1 for a failed or stopped run, 2 if no run started, 3 if
# the run is still going after the log stream ended and RUN_STATUS_TIMEOUT seconds, default 60,
# have passed). Results land on the SuperLink machine in $FLWR_HOME/outputs/<run id> (the
# SuperLink's FLWR_HOME); the log line "results go to ..." names the folder.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 CONNECTION [flwr run options]" >&2
    exit 2
fi
connection=$1
shift
app_dir=$(cd "$(dirname "$0")/../.." && pwd)
export FLWR_TELEMETRY_ENABLED=${FLWR_TELEMETRY_ENABLED:-0}
export FLWR_DISABLE_UPDATE_CHECK=${FLWR_DISABLE_UPDATE_CHECK:-1}
log=$(mktemp)
trap 'rm -f "$log"' EXIT

flwr run "$app_dir" "$connection" --stream "$@" 2>&1 | tee "$log"
run_rc=${PIPESTATUS[0]}
run_id=$(sed -n 's/.*Successfully started run \([0-9][0-9]*\).*/\1/p' "$log" | head -n 1)
if [ -z "$run_id" ]; then
    echo "run.sh: no run was started (flwr run exited with $run_rc)" >&2
    exit 2
fi

deadline=$((SECONDS + ${RUN_STATUS_TIMEOUT:-60}))
while :; do
    status=$(flwr ls --run-id "$run_id" "$connection" --format json 2>/dev/null | python3 -c '
import json, sys
try:
    (run,) = json.load(sys.stdin)["runs"]
    print(run["status"] + "\t" + str(run.get("status-details", "")))
except Exception as error:
    print("unknown\t" + repr(error))
')
    state=${status%%$'\t'*}
    details=${status#*$'\t'}
    [[ $state == finished:* ]] && break
    if ((SECONDS >= deadline)); then
        echo "run.sh: run $run_id is $state after its log stream ended;" \
            "follow it with: flwr log $run_id $connection" >&2
        exit 3
    fi
    sleep 2
done

folder=$(sed -n 's/.*results go to \(.*\)$/\1/p' "$log" | head -n 1)
if [ "$state" = "finished:completed" ]; then
    echo "run.sh: run $run_id $state${folder:+; results on the SuperLink in $folder}"
    exit 0
fi
echo "run.sh: run $run_id $state: $details" >&2
exit 1
