"""`shardtrain plan --max KEY`: the command-line side of compiler/maxfit.py (issue 20, point 1).

The config and flags resolve as for `plan` (config/pipeline.py); the searched key's own value is replaced
by the search, so giving its flag too is refused (one line). Output: the `plan` table headed by the max
line, or with --json the plan object at the value plus ``"max": {...}`` (MaxResult.to_json). Nothing fits
even at the smallest value: exit 2 and one line, with the re-planned "to fit, try" suggestions as `plan`
gives them.
"""
from __future__ import annotations

import argparse
import json
import sys

from shardtrain.exitcodes import EXIT_NO_FIT, EXIT_OK

#: the flags whose value each --max key replaces (see compiler/maxfit.py: what stays fixed)
_REPLACED_FLAGS = {"seq-len": ("seq_len",), "micro-batch": ("micro_batch", "global_batch"),
                   "global-batch": ("global_batch",)}


def add_max_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max", choices=("seq-len", "micro-batch", "global-batch"), default=None,
                   help="search the largest value of this key that fits (everything else as given or auto); "
                        "micro-batch/global-batch: global = micro × (GPUs / forced tp × cp), accumulation 1 "
                        "unless the chosen mesh adds tp/cp (see compiler/maxfit.py)")


def run_plan_max(args: argparse.Namespace) -> int:
    from shardtrain.cli import _public_json, one_line
    from shardtrain.compiler.maxfit import MaxKey, NothingFitsError, find_max, overrides_at
    from shardtrain.compiler.planner import NoFitError, PlanningError
    from shardtrain.config.flags import overrides_from_args
    from shardtrain.config.pipeline import assumed_limits, load, plan_for
    from shardtrain.config.resolve import resolve_specs
    from shardtrain.report import render_max
    key = MaxKey(args.max)
    given = [f"--{d.replace('_', '-')}" for d in _REPLACED_FLAGS[key.value] if getattr(args, d, None) is not None]
    if given:
        raise PlanningError(f"--max {key.value} searches the value of {' and '.join(given)}: drop "
                            f"{'them' if len(given) > 1 else 'it'} (see `plan --help` for what stays fixed)")
    if getattr(args, "trace", False):
        raise PlanningError("--trace with --max: run `plan` again with the value found to trace that plan")
    cfg = load(args.config, overrides_from_args(args))
    model, hw, train = resolve_specs(cfg)
    try:
        r = find_max(model, hw, train, key)
    except NothingFitsError as e:
        if not isinstance(e.cause, NoFitError):
            raise e.cause from None  # bad input, not a memory verdict: exit 1 with the planner's line
        msg = str(e)
        try:  # the same verdict through the pipeline, which adds the verified suggestions
            plan_for(load(cfg, overrides_at(key, e.value, hw, train)))
        except NoFitError as full:
            msg = f"--max {key.value}: at {key.noun} {e.value:,}, the smallest value, {full}"
        print("shardtrain: " + one_line(msg), file=sys.stderr)
        return EXIT_NO_FIT
    import dataclasses
    p = dataclasses.replace(r.plan, assumed=assumed_limits(cfg))
    r = dataclasses.replace(r, plan=p)
    if args.json:
        d = p.to_json() if args.full_json else _public_json(p.to_json())
        d["max"] = r.to_json()
        print(json.dumps(d, indent=2))
    else:
        print(render_max(r))
    return EXIT_OK
