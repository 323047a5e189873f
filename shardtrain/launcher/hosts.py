"""What this machine offers the launch, probed without importing torch: GPUs (/proc and /dev), the
CPU cores this process may use, and the DeepSpeed ops built for this environment."""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path


def count_local_gpus(environ: Mapping[str, str] | None = None) -> int:
    """NVIDIA GPUs this process may use, without importing torch (a driver must be present:
    /proc/driver/nvidia/gpus or /dev/nvidiaN); CUDA_VISIBLE_DEVICES limits the count."""
    environ = os.environ if environ is None else environ
    n = 0
    proc = Path("/proc/driver/nvidia/gpus")
    try:
        n = len(list(proc.iterdir())) if proc.is_dir() else 0
    except OSError:
        n = 0
    if n == 0:
        n = sum(1 for p in Path("/dev").glob("nvidia[0-9]*"))
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = [x for x in cvd.split(",") if x.strip() and x.strip() != "-1"]
        n = min(n, len(ids))
    return n


def local_devices(device_pref: str = "auto") -> tuple[int, str]:
    """(usable GPUs, "cuda"|"cpu") for run.device auto|cpu|cuda."""
    if device_pref == "cpu":
        return 0, "cpu"
    n = count_local_gpus()
    if device_pref == "cuda" and n == 0:
        raise ValueError("run.device: cuda, but no NVIDIA GPU is visible here (no /proc/driver/nvidia/gpus, "
                         "or CUDA_VISIBLE_DEVICES hides them); set run.device: auto to train on CPU")
    return n, ("cuda" if n else "cpu")


def ops_env(environ: Mapping[str, str] | None = None, prefix: str | None = None) -> dict[str, str]:
    """TORCH_EXTENSIONS_DIR=<venv>/torch_extensions when it exists and nothing else was chosen: the
    DeepSpeed C++ ops `make test` built for this environment (Makefile) are then found by the workers
    instead of being JIT-compiled again by every rank at once."""
    environ = os.environ if environ is None else environ
    d = Path(prefix or sys.prefix) / "torch_extensions"
    if "TORCH_EXTENSIONS_DIR" not in environ and d.is_dir():
        return {"TORCH_EXTENSIONS_DIR": str(d)}
    return {}


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
