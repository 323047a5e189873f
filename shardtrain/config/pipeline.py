"""The ONE config -> plan pipeline of every command (plan, emit, check, launch, sbatch, the OOM re-plan).

    compile(config, overrides) -> (RunConfig, Plan)

``config`` is a run-config YAML path, a raw mapping (as from YAML), an already validated RunConfig
(re-validated only when there are overrides) or None (flags/overrides only); ``overrides`` are dotted
keys (``{"train.seq_len": "2048"}``: config/flags.py turns the command line into them). The YAML is
read once per call; the compiler stays pure (config/resolve.py reads model config files for it).

When nothing fits, :func:`plan_for` hands compiler/advice.py a :func:`replanner` (this config plus
``--set``-style overrides -> Plan): every "to fit, try" suggestion is re-planned here, by the same
pipeline, before it is shown.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping

from shardtrain.compiler.plan import Plan
from shardtrain.config.schema import ConfigError, RunConfig, load_run_config, parse_run_config

ConfigSource = str | os.PathLike | Mapping | RunConfig | None


def load(config: ConfigSource, overrides: Mapping[str, object] | None = None) -> RunConfig:
    """Validate ``config`` (see the module docstring) with dotted overrides applied (ConfigError if bad)."""
    overrides = dict(overrides or {})
    if isinstance(config, RunConfig):
        return parse_run_config(config.to_dict(), overrides) if overrides else config
    if isinstance(config, Mapping):
        return parse_run_config(dict(config), overrides)
    return load_run_config(config, overrides)


def plan_for(cfg: RunConfig, *, must_fit: bool = False, advise: bool = True) -> Plan:
    """The plan of a validated config (raises NoFitError/PlanningError/ConfigError). ``must_fit``: a
    forced strategy that does not fit raises NoFitError too (a run dir is never prepared for it).
    When nothing fits and ``advise``: the NoFitError's plan carries the suggestions that fit, each
    re-planned through this pipeline (compiler/advice.py), and its message lists them."""
    from shardtrain.compiler import advice
    from shardtrain.compiler.planner import NoFitError
    try:
        p = dataclasses.replace(_raw_plan(cfg), assumed=assumed_limits(cfg))
    except NoFitError as e:
        p = dataclasses.replace(e.plan, assumed=assumed_limits(cfg))
        replans = 0
        if advise:
            suggestions, replans = advice.advise(p, replanner(cfg))
            p = dataclasses.replace(p, suggestions=suggestions)
        from shardtrain.report import suggestion_args
        raise NoFitError(advice.no_fit_message(p, replans, suggestion_args), p) from None
    if must_fit and not p.chosen.fits:
        raise NoFitError(f"the {p.strategy.value} plan does not fit: {'; '.join(p.chosen.why_not)}", p)
    return p


def _raw_plan(cfg: RunConfig) -> Plan:
    from shardtrain.compiler.planner import plan
    from shardtrain.config.resolve import resolve_specs
    return plan(*resolve_specs(cfg))


def assumed_limits(cfg: RunConfig) -> tuple[tuple[str, int], ...]:
    """The hardware limits the plan rests on that the config did not give (defaults the user should
    confirm): host RAM always, NVMe capacity when an NVMe path is set."""
    from shardtrain.config.resolve import DEFAULT_CPU_MEMORY_BYTES, DEFAULT_NVME_CAPACITY_BYTES
    h = cfg.hardware
    out = []
    if h.cpu_memory is None:
        out.append(("hardware.cpu_memory", DEFAULT_CPU_MEMORY_BYTES))
    if h.nvme_path and h.nvme_capacity is None:
        out.append(("hardware.nvme_capacity", DEFAULT_NVME_CAPACITY_BYTES))
    return tuple(out)


def _set_keys(cfg: RunConfig) -> dict:
    """The config as a raw mapping of only the keys that differ from their defaults: what the user set
    (a re-plan pins nothing else; config/coerce.py keeps to_dict() round trips equal, e.g. lora.targets)."""
    have, default = cfg.to_dict(), RunConfig().to_dict()
    return {s: {k: v for k, v in keys.items() if v != default[s][k]} for s, keys in have.items()}


def replanner(cfg: RunConfig):
    """``overrides -> Plan | None`` for compiler/advice.py: this config with ``--set``-style overrides,
    planned (the least-memory plan when nothing fits; None when the overrides are invalid here). The
    model is resolved once: advice never changes model.* keys, and re-reading config.json per re-plan
    would be I/O in a loop."""
    from shardtrain.compiler.planner import NoFitError, PlanningError, plan
    from shardtrain.config.resolve import resolve_hardware, resolve_model, resolve_train
    raw, model = _set_keys(cfg), resolve_model(cfg)

    def replan(overrides: Mapping[str, str]) -> Plan | None:
        try:
            c = parse_run_config(raw, dict(overrides))
            return plan(model, resolve_hardware(c), resolve_train(c))
        except NoFitError as e:
            return e.plan
        except (ConfigError, PlanningError):
            return None
    return replan


def compile(config: ConfigSource, overrides: Mapping[str, object] | None = None, *,  # noqa: A001
            must_fit: bool = False, advise: bool = True) -> tuple[RunConfig, Plan]:
    """config + overrides -> (RunConfig, Plan): :func:`load` then :func:`plan_for`. ``advise=False``
    for callers that only ask "does this fit?" (the OOM re-plan): no "to fit, try" search (up to
    compiler/advice.py's MAX_REPLANS re-plans) when it does not."""
    cfg = load(config, overrides)
    return cfg, plan_for(cfg, must_fit=must_fit, advise=advise)


def compile_args(args: argparse.Namespace) -> tuple[RunConfig, Plan]:
    """A command's parsed plan flags (args.config, --set, --model, ...) -> (RunConfig, Plan)."""
    from shardtrain.config.flags import overrides_from_args
    return compile(args.config, overrides_from_args(args))
