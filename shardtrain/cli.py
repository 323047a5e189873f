"""`shardtrain` command line: one small function per subcommand.

Heavy imports (torch, deepspeed, transformers) never happen on the `plan` path: it must answer in
well under 2 s cold.
"""
from __future__ import annotations

import argparse
import json
import sys

from shardtrain.config.schema import FLAG_KEYS, ConfigError

EXIT_OK, EXIT_ERROR, EXIT_NO_FIT = 0, 1, 2


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by plan/emit/launch/sbatch: each maps to a run-config key (FLAG_KEYS)."""
    p.add_argument("config", nargs="?", help="run config YAML (flags override it)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set train.lr=1e-4")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="preset name, config.json, HF checkpoint dir or Hub id ORG/NAME[@REVISION]")
    g.add_argument("--params", help="parameter count instead of --model, e.g. 7.5e9")
    for k in ("hidden", "layers", "heads", "kv-heads", "vocab", "intermediate"):
        g.add_argument(f"--{k}", type=int, help=f"{k} (with --params)")
    g = p.add_argument_group("hardware")
    g.add_argument("--nodes", type=int)
    g.add_argument("--gpus-per-node", type=int)
    g.add_argument("--gpu", help="GPU preset, e.g. h100-80gb (see `shardtrain presets`)")
    g.add_argument("--gpu-memory", help="per-GPU memory, e.g. 80GiB")
    g.add_argument("--cpu-memory", help="host RAM per node, e.g. 1TiB")
    g.add_argument("--nvme-path")
    g.add_argument("--nvme-capacity")
    g = p.add_argument_group("job")
    g.add_argument("--seq-len", type=int)
    g.add_argument("--micro-batch", help="auto or N")
    g.add_argument("--global-batch", type=int)
    g.add_argument("--precision", help="bf16|fp16|fp32")
    g.add_argument("--method", help="full|lora|qlora")
    g.add_argument("--lora-rank", type=int)
    g.add_argument("--optimizer", help="adamw|adamw8bit|adafactor|lion|sgd")
    g.add_argument("--grad-ckpt", help="auto|none|full|selective")
    g.add_argument("--attention", help="sdpa|flash|eager")
    g.add_argument("--loss", help="full|chunked|auto (chunked: never the whole fp32 logits)")
    g.add_argument("--activation-offload", help="none|cpu (allow saved activations in host RAM)")
    g.add_argument("--strategy", help="auto|ddp|zero1|zero2|zero3|fsdp_full_shard|fsdp_shard_grad_op|"
                                     "fsdp_hybrid_shard|zero2_offload|zero3_offload|zero_infinity")
    g.add_argument("--steps", type=int)


def overrides_from_args(args: argparse.Namespace) -> dict[str, object]:
    """Collect flag values and --set pairs as dotted config overrides (flags beat the file)."""
    out: dict[str, object] = {}
    for s in args.sets:
        if "=" not in s:
            raise ConfigError(f"--set {s!r}: write KEY=VALUE, e.g. --set train.seq_len=2048")
        k, v = s.split("=", 1)
        out[k.strip()] = v
    for flag, key in FLAG_KEYS.items():
        v = getattr(args, flag, None)
        if v is not None:
            out[key] = v
    if out.get("model.params") is not None and out.get("model.name") is not None:
        raise ConfigError(f"--model {out['model.name']!r} and --params {out['model.params']!r} conflict: give one "
                          "(a preset/config.json with --model, or a parameter count with --params)")
    if "model.params" in out and "model.name" not in out:
        out["model.name"] = None
    if "model.name" in out and out["model.name"] is not None:
        out["model.params"] = None
    return out


def compile_from_args(args: argparse.Namespace):
    """Load config + flags, plan. Returns (RunConfig, Plan). Raises ConfigError/PlanningError."""
    from shardtrain.compiler.planner import plan
    from shardtrain.config.resolve import resolve_specs
    from shardtrain.config.schema import load_run_config
    cfg = load_run_config(args.config, overrides_from_args(args))
    model, hw, train = resolve_specs(cfg)
    return cfg, plan(model, hw, train)


def cmd_plan(args: argparse.Namespace) -> int:
    from shardtrain.compiler.planner import NoFitError
    from shardtrain.report import render_plan
    no_fit = None
    try:
        _, p = compile_from_args(args)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardtrain", description="Plan, emit and launch distributed LLM training "
                                     "that fits in GPU memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="predict per-GPU memory for every strategy and pick the fastest that fits")
    add_plan_flags(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--full-json", action="store_true", help="with --json: include the spec block (as plan.json)")
    p.add_argument("--trace", action="store_true", help="also trace the plan's training step on the CPU under "
                   "FakeTensorMode (torch's MemTracker/FSDPMemTracker) and show it beside the analytic peak")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("presets", help="list bundled model and GPU presets")
    p.set_defaults(func=cmd_presets)
    for modname in ("shardtrain.emit.cli", "shardtrain.launcher.cli", "shardtrain.slurm.cli", "shardtrain.runreport"):
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
        mod.add_parsers(sub, add_plan_flags)
    else:  # shardtrain.slurm.cli
        mod.add_sbatch_parser(sub)


def main(argv: list[str] | None = None) -> int:
    from shardtrain.compiler.planner import PlanningError
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, PlanningError) as e:
        print(f"shardtrain: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR


def one_line(msg: str) -> str:
    """Error text as ONE printable line: values echoed from user files may hold newlines or control
    characters (a YAML key "\r"), which would split or garble the `shardtrain: error:` line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)


if __name__ == "__main__":
    sys.exit(main())
