"""The only place that runs ``sbatch`` (all other slurm code is pure)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Optional, Sequence, Union

__all__ = ["SubmitError", "parse_job_id", "submit"]

_PARSABLE = re.compile(r"^\s*(\d+)(?:_\d+)?(?:;\S+)?\s*$")
_HUMAN = re.compile(r"Submitted batch job (\d+)")


class SubmitError(RuntimeError):
    """sbatch failed or printed no job id."""


def parse_job_id(stdout: str) -> str:
    """Job id from ``sbatch --parsable`` (``123`` or ``123;cluster``) or plain sbatch output
    (``Submitted batch job 123``)."""
    for line in stdout.splitlines():
        m = _PARSABLE.match(line) or _HUMAN.search(line)
        if m:
            return m.group(1)
    raise SubmitError(f"no job id in sbatch output: {stdout!r}")


def submit(
    script: Union[str, Path],
    *,
    sbatch: str = "sbatch",
    extra_args: Sequence[str] = (),
    env: Optional[dict[str, str]] = None,
    cwd: Optional[Union[str, Path]] = None,
    timeout: float = 60.0,
) -> str:
    """Submit the batch script at path ``script`` and return the job id.

    ``extra_args`` go before the script path (command-line options override ``#SBATCH`` lines).
    """
    cmd = [sbatch, "--parsable", *extra_args, os.fspath(script)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise SubmitError(f"{sbatch!r} not found: is Slurm installed on this machine?") from exc
    except subprocess.TimeoutExpired as exc:
        raise SubmitError(f"sbatch did not answer within {timeout:g} s") from exc
    if proc.returncode != 0:
        raise SubmitError(
            f"sbatch failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()}"
        )
    return parse_job_id(proc.stdout)
