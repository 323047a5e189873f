"""shardtrain's worker with optimizer steps profiled on rank 0 (benchmarks/profile_step.py).

    torchrun ... benchmarks/_profiled_worker.py --run-dir DIR --profile-out F

Wraps `shardtrain.runtime.worker.train_step` (looked up by the loop at every step) and runs the worker
unchanged otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys

from _profiling import StepWindow

from shardtrain.runtime import worker


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile-out", required=True)
    args, rest = ap.parse_known_args()
    window = StepWindow(args.profile_out, rank=int(os.environ.get("RANK", "0")))
    inner = worker.train_step

    def train_step(r, step, *a, **k):
        window.begin(step)
        rec = inner(r, step, *a, **k)
        window.end(step)
        return rec

    worker.train_step = train_step
    return worker.main(rest)


if __name__ == "__main__":
    sys.exit(main())
