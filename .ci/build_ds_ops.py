"""Build DeepSpeed's JIT C++ ops once, in one process, before any multi-rank test.

Several ranks compiling the same op at once have hung for minutes (shared/notes/cpu-distributed.md),
so CI and `make test` call this first. Stale lock files from killed builds are removed first.
Usage: python .ci/build_ds_ops.py [--no-aio]
"""
from __future__ import annotations

import os
import pathlib
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
STALE_LOCK_S = 900


def main() -> int:
    root = pathlib.Path(os.environ.get("TORCH_EXTENSIONS_DIR", pathlib.Path.home() / ".cache/torch_extensions"))
    for lock in root.rglob("lock"):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:  # a live build touches it recently
            print(f"removing stale lock {lock}")
            lock.unlink(missing_ok=True)
    from deepspeed.accelerator import get_accelerator
    # shm_comm: CPU collectives; cpu_adam / cpu_lion: ZeRO-Offload optimizers; async_io: NVMe.
    names = ["ShareMemCommBuilder", "CPUAdamBuilder", "CPULionBuilder"]
    if "--no-aio" not in sys.argv:
        names.append("AsyncIOBuilder")
    for name in names:
        t0 = time.time()
        builder = get_accelerator().create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=True):
            print(f"{name}: not compatible on this machine", flush=True)
            return 1
        builder.load()
        print(f"{name}: ready in {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
