#!/usr/bin/env bash
# The main job: a tiny Llama on the bundled corpus, 2 processes (CPU/gloo without GPUs), ~100 steps.
set -euo pipefail
cd "$(dirname "$0")/.."
exec launch/train.sh configs/examples/tiny-cpu.yaml "$@"
