#!/usr/bin/env bash
# Re-run a prepared run dir's exact launcher command (its command.txt) without recompiling:
#   launch/rerun.sh runs/tiny-cpu
# The workers resume from the run dir's latest checkpoint.
set -euo pipefail
run_dir="${1:?usage: launch/rerun.sh RUN_DIR}"
shift
exec bash "$run_dir/command.txt" "$@"
