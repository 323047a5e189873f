"""Start torchrun or the deepspeed launcher on a prepared run dir, and say clearly how it went.

A façade over the modules that do it, one concern each (import from them in new code):

- :mod:`shardtrain.launcher.rankstart`  what to run: :class:`LaunchSpec` (argv + the environment
  we add), :func:`choose_launcher`, :func:`build_launch`, :func:`free_port` (pure);
- :mod:`shardtrain.launcher.hosts`      what this machine offers: :func:`local_devices`,
  :func:`count_local_gpus`, :func:`cpu_count`, :func:`ops_env` (reads /proc and /dev, never torch);
- :mod:`shardtrain.launcher.supervise`  :func:`run`: the launcher process, its logs, signals, the
  summary line; the live console is :mod:`shardtrain.launcher.logtail`;
- :mod:`shardtrain.launcher.failure`    the first failing rank and :class:`LaunchResult`;
- :mod:`shardtrain.launcher.restart`    pre-emption and torchrun's elastic restarts.
"""
from __future__ import annotations

# The pure launch spec lives in rankstart; re-exported for the callers that import it from here.
from shardtrain.launcher.rankstart import (LaunchSpec, build_launch, choose_launcher,  # noqa: F401
                                           free_port)
from shardtrain.launcher.failure import LaunchResult, RankFailure, find_first_failure, rel  # noqa: F401
from shardtrain.launcher.hosts import count_local_gpus, cpu_count, local_devices, ops_env  # noqa: F401
from shardtrain.launcher.supervise import run  # noqa: F401

_rel = rel  # launcher/cli.py's name for it

__all__ = ["LaunchSpec", "build_launch", "choose_launcher", "free_port", "LaunchResult", "RankFailure",
           "find_first_failure", "rel", "count_local_gpus", "cpu_count", "local_devices", "ops_env", "run"]
