"""The worker process's surroundings (runtime/worker.py): the run keys it needs before the process group
exists, its logging, and the stop marker of `launch --max-restarts` (exitcodes.STOP_MARKER_ENV)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from shardtrain import rundir_format as rf
from shardtrain.exitcodes import STOP_MARKER_ENV


def early_run_keys(run_dir: Path) -> tuple[str, bool]:
    """run.device and run.bind_cpu_cores: needed before the process group exists (Settings is read after)."""
    import yaml
    run = (yaml.safe_load((run_dir / rf.RUN_YAML).read_text()) or {}).get("run") or {}
    return run.get("device", "auto"), bool(run.get("bind_cpu_cores", True))


def setup_logging(run_dir: Path, rank: int) -> None:
    (run_dir / rf.LOGS).mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("shardtrain")
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(message)s")
    fh = logging.FileHandler(run_dir / rf.LOGS / rf.worker_log_name(rank))
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
    root.propagate = False


def stop_marker() -> Path | None:
    """exitcodes.STOP_MARKER_ENV's file; a stale one from an earlier attempt is removed first."""
    v = os.environ.get(STOP_MARKER_ENV)
    if not v:
        return None
    if os.environ.get("LOCAL_RANK", "0") == "0":
        Path(v).unlink(missing_ok=True)
    return Path(v)


def leave_stop_code(marker: Path | None, code: int, step: int) -> int:
    """The worker's exit code. Under a stop marker a deliberate stop (75 pre-empted, 65 non-finite) is
    written there by local rank 0 and the process exits 0, so torchrun does not restart the group for it
    (launcher/restart.py)."""
    if not code or marker is None:
        return code
    if os.environ.get("LOCAL_RANK", "0") == "0":
        marker.write_text(f"{code} {step}\n")
    return 0
