"""`shardtrain` command line: one small function per subcommand.

Heavy imports (torch, deepspeed, transformers) never happen on the `plan` path: it must answer in
well under 2 s cold.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys

from shardtrain.config.flags import add_plan_flags
from shardtrain.config.schema import ConfigError

from shardtrain.exitcodes import EXIT_ERROR, EXIT_NO_FIT, EXIT_OK  # noqa: E402


def cmd_plan(args: argparse.Namespace) -> int:
    if getattr(args, "max", None):  # issue 20: the largest value that fits (shardtrain/plan_max.py)
        from shardtrain.plan_max import run_plan_max
        return run_plan_max(args)
    from shardtrain.compiler.planner import NoFitError
    from shardtrain.config.pipeline import compile_args
    from shardtrain.report import render_plan
    no_fit = None
    try:
        _, p = compile_args(args)
    except NoFitError as e:
        no_fit, p = e, e.plan
    trace = None
    if getattr(args, "trace", False):
        from shardtrain.trace.render import trace_or_error   # imports torch: only with --trace
        trace, err = trace_or_error(p)
        if err:
            print(f"shardtrain: {err}", file=sys.stderr)
            return EXIT_ERROR
    if args.json:
        d = p.to_json() if args.full_json else _public_json(p.to_json())
        if trace is not None:
            d["trace"] = trace.to_json()
        print(json.dumps(d, indent=2))
    else:
        print(render_plan(p))
        if trace is not None:
            from shardtrain.trace.render import render_trace
            print("\n" + render_trace(p, trace))
    if no_fit is not None:
        print(f"\nshardtrain: {no_fit}", file=sys.stderr)
        return EXIT_NO_FIT
    return EXIT_OK if p.chosen.fits else EXIT_NO_FIT


def _public_json(d: dict) -> dict:
    """`plan --json` prints the documented object (the spec block is only in plan.json files)."""
    d = dict(d)
    d.pop("spec", None)
    return d


def cmd_presets(args: argparse.Namespace) -> int:
    from shardtrain.config.presets import GPU_PRESETS, list_model_presets, load_model_spec
    from shardtrain.units import fmt_bytes
    print("models:")
    for n in list_model_presets():
        s = load_model_spec(n)
        print(f"  {n:<16} {s.num_params / 1e9:8.3f}B  layers {s.num_layers:>3}  hidden {s.hidden_size:>6}  "
              f"vocab {s.vocab_size:>6}")
    print("gpus:")
    for g in GPU_PRESETS.values():
        print(f"  {g.name:<12} {fmt_bytes(g.memory_bytes):>10}  {g.bf16_tflops:6.0f} TFLOP/s")
    return EXIT_OK


class SuggestingParser(argparse.ArgumentParser):
    """argparse with did-you-mean (issue 22): a misspelt subcommand or choice ("invalid choice: 'pln'") and a
    misspelt flag ("unrecognized arguments: --seq-lne") get the nearest valid spelling (difflib). Python
    3.14's `suggest_on_error` does the first part only; subparsers inherit this class (add_parser)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._flag_hint(extras, ns)}")
        return ns

    def error(self, message: str):  # type: ignore[override]
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = [c.strip().strip("'\"") for c in m.group(2).split(",")]
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.5)
            if close:
                message += f" — did you mean '{close[0]}'?"
        super().error(message)

    def _flag_hint(self, extras: list[str], ns: argparse.Namespace) -> str:
        """' — did you mean --x?' for each unknown flag with a close option of the chosen subcommand."""
        options = list(self._option_string_actions)
        for a in self._actions:
            if isinstance(a, argparse._SubParsersAction) and getattr(ns, a.dest, None) in a.choices:
                options += list(a.choices[getattr(ns, a.dest)]._option_string_actions)
        hints = {}
        for word in extras:
            flag = word.split("=", 1)[0]
            if flag.startswith("-") and (close := difflib.get_close_matches(flag, options, n=1, cutoff=0.6)):
                hints[flag] = close[0]
        if len(hints) == 1:
            return f" — did you mean {next(iter(hints.values()))}?"
        return (" — did you mean " + ", ".join(f"{v} for {k}" for k, v in hints.items()) + "?") if hints else ""


def build_parser() -> argparse.ArgumentParser:
    parser = SuggestingParser(prog="shardtrain", description="Plan, emit and launch distributed LLM training "
                              "that fits in GPU memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="predict per-GPU memory for every strategy and pick the fastest that fits")
    add_plan_flags(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--full-json", action="store_true", help="with --json: include the spec block (as plan.json)")
    p.add_argument("--trace", action="store_true", help="also trace the plan's training step on the CPU under "
                   "FakeTensorMode (torch's MemTracker/FSDPMemTracker) and show it beside the analytic peak")
    from shardtrain.plan_max import add_max_flag
    add_max_flag(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("presets", help="list bundled model and GPU presets")
    p.set_defaults(func=cmd_presets)
    for modname in ("shardtrain.emit.cli", "shardtrain.launcher.cli", "shardtrain.slurm.cli", "shardtrain.runreport",
                    "shardtrain.verify"):
        _add_optional(sub, modname)
    return parser


def _add_optional(sub, modname: str) -> None:
    """Subcommands defined next to their implementation (emit/check, launch, sbatch)."""
    import importlib
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name != modname:
            raise
        return
    if hasattr(mod, "add_parsers"):
        mod.add_parsers(sub)
    else:  # shardtrain.slurm.cli
        mod.add_sbatch_parser(sub)


def main(argv: list[str] | None = None) -> int:
    from shardtrain.compiler.planner import PlanningError
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PlanningError) as e:
        print(error_text(str(e)), file=sys.stderr)
        return EXIT_ERROR


def one_line(msg: str) -> str:
    """Text as ONE printable line: values echoed from user files may hold newlines or control
    characters (a YAML key "\r"), which would split or garble the `shardtrain: error:` line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)


def error_text(msg: str, prefix: str = "shardtrain: error: ") -> str:
    """An error for the terminal: the message's line breaks become lines (issue 21: a multi-line message,
    such as the run dir's config mismatch, printed a literal \\n), the first after ``prefix``, the rest
    indented under it. Every other control character is escaped as in :func:`one_line` (a "\\r" or an
    escape sequence from a user file cannot rewrite the line), and since a break only ever starts an
    indented continuation, no text from a file can pose as a line of its own."""
    lines = msg.rstrip("\n").split("\n")
    return "\n".join([prefix + one_line(lines[0]), *("  " + one_line(ln) for ln in lines[1:])])


if __name__ == "__main__":
    sys.exit(main())
