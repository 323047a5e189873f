#!/usr/bin/env bash
# Launch a run: compile the plan, prepare the run dir, start torchrun / the deepspeed launcher.
#   launch/train.sh RUN.yaml [shardtrain launch flags...]     e.g. launch/train.sh configs/examples/tiny-cpu.yaml
# On a multi-node cluster run it on every node with --nnodes N --node-rank R --rdzv-endpoint HEAD:PORT.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="$here/.venv/bin/shardtrain"
[ -x "$bin" ] || bin=shardtrain
exec "$bin" launch "$@"
