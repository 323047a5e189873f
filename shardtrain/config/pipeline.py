"""The ONE config -> plan pipeline of every command (plan, emit, check, launch, sbatch, the OOM re-plan).

    compile(config, overrides) -> (RunConfig, Plan)

``config`` is a run-config YAML path, a raw mapping (as from YAML), an already validated RunConfig
(re-validated only when there are overrides) or None (flags/overrides only); ``overrides`` are dotted
keys (``{"train.seq_len": "2048"}``: config/flags.py turns the command line into them). The YAML is
read once per call; the compiler stays pure (config/resolve.py reads model config files for it).
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from shardtrain.compiler.plan import Plan
from shardtrain.config.schema import RunConfig, load_run_config, parse_run_config

ConfigSource = str | os.PathLike | Mapping | RunConfig | None


def load(config: ConfigSource, overrides: Mapping[str, object] | None = None) -> RunConfig:
    """Validate ``config`` (see the module docstring) with dotted overrides applied (ConfigError if bad)."""
    overrides = dict(overrides or {})
    if isinstance(config, RunConfig):
        return parse_run_config(config.to_dict(), overrides) if overrides else config
    if isinstance(config, Mapping):
        return parse_run_config(dict(config), overrides)
    return load_run_config(config, overrides)


def plan_for(cfg: RunConfig, *, must_fit: bool = False) -> Plan:
    """The plan of a validated config (raises NoFitError/PlanningError/ConfigError). ``must_fit``: a
    forced strategy that does not fit raises NoFitError too (a run dir is never prepared for it)."""
    from shardtrain.compiler.planner import NoFitError, plan
    from shardtrain.config.resolve import resolve_specs
    p = plan(*resolve_specs(cfg))
    if must_fit and not p.chosen.fits:
        raise NoFitError(f"the {p.strategy.value} plan does not fit: {'; '.join(p.chosen.why_not)}", p)
    return p


def compile(config: ConfigSource, overrides: Mapping[str, object] | None = None, *,  # noqa: A001
            must_fit: bool = False) -> tuple[RunConfig, Plan]:
    """config + overrides -> (RunConfig, Plan): :func:`load` then :func:`plan_for`."""
    cfg = load(config, overrides)
    return cfg, plan_for(cfg, must_fit=must_fit)


def compile_args(args: argparse.Namespace) -> tuple[RunConfig, Plan]:
    """A command's parsed plan flags (args.config, --set, --model, ...) -> (RunConfig, Plan)."""
    from shardtrain.config.flags import overrides_from_args
    return compile(args.config, overrides_from_args(args))
