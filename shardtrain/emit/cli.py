"""`shardtrain emit` and `shardtrain check` (registered by shardtrain/cli.py through add_parsers)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shardtrain.exitcodes import EXIT_ERROR, EXIT_NO_FIT, EXIT_OK  # noqa: E402


def add_parsers(sub) -> None:
    from shardtrain.config.flags import add_plan_flags
    from shardtrain.emit.bundle import FORMATS
    p = sub.add_parser("emit", help="write DeepSpeed/FSDP/accelerate configs and launch commands for the plan",
                       description="Compile the plan and write into --out DIR: for your own script trainer_args.json "
                       "(TrainingArguments), hf_ds_config.json (DeepSpeed for the Trainer/accelerate), lora_config.json"
                       " / bnb_config.json (LoRA/QLoRA), accelerate.yaml and README.md (what your script must do); for "
                       "shardtrain's worker plan.json, run.yaml, ds_config.json or fsdp.json, launch.sh and, for "
                       "multi-node DeepSpeed, hostfile (`bash DIR/launch.sh` trains). Or print one with --format.")
    add_plan_flags(p)
    g = p.add_argument_group("emit")
    g.add_argument("--out", metavar="DIR", help="directory to write all files into")
    g.add_argument("--format", choices=FORMATS, help="print one output to stdout; trainer = DeepSpeed JSON for "
                   "TrainingArguments(deepspeed=...) and accelerate (hf_ds_config.json); trainer-args = "
                   "TrainingArguments keyword arguments (trainer_args.json); readme = the bundle's README.md")
    g.add_argument("--hosts", help="comma-separated node host names (multi-node hostfile; first = master)")
    g.add_argument("--master-addr", help="first node's address (multi-node rendezvous)")
    g.add_argument("--master-port", type=int, help="rendezvous port (default: derived from the run dir, 20000-29999)")
    g.add_argument("--run-dir", help="run directory the launch commands point at (default: --out, absolute)")
    p.set_defaults(func=cmd_emit)

    p = sub.add_parser("check", help="lint a DeepSpeed JSON, accelerate YAML or any file emit writes (and "
                       "optionally: does it fit?)",
                       description="Lint FILE (DeepSpeed JSON or accelerate YAML) against the installed DeepSpeed/"
                       "accelerate (what they refuse: error; what they silently ignore: warning), plus "
                       "offload_param below stage 3, NVMe without a path, batch arithmetic, stray \"auto\" values, "
                       "8-bit optimizers with offload, QLoRA quant-storage dtype. With a run config or --model, "
                       "also plan the file's strategy and say whether it fits. Every other file `emit --out` writes "
                       "is recognised by its content and checked by the code that reads it: fsdp.json, "
                       "trainer_args.json (TrainingArguments + transformers' DeepSpeed mismatch check), "
                       "lora_config.json (peft), bnb_config.json (BitsAndBytesConfig), plan.json, run.yaml, "
                       "launch.sh (bash -n), hostfile (DeepSpeed's parser), README.md. Exit 1 on errors in any FILE, "
                       "else 2 when a setup does not fit.")
    p.add_argument("files", metavar="FILE", nargs="+", help="files emit wrote (e.g. BUNDLE/*), your ds_config.json "
                   "or accelerate YAML; each is checked on its own")
    add_plan_flags(p)
    g = p.add_argument_group("check")
    g.add_argument("--target", choices=("auto", "trainer", "deepspeed"), default="auto",
                   help='who reads the DeepSpeed JSON: trainer (HF Trainer/TrainingArguments(deepspeed=...) fills '
                   '"auto" values) or deepspeed (deepspeed.initialize); default: trainer when "auto" values are present')
    g.add_argument("--trainer", action="store_const", dest="target", const="trainer", help="same as --target trainer")
    g.add_argument("--json", action="store_true", help="print one JSON object per finding (file, key, severity, "
                   "message, fix)")
    g.add_argument("--quant-storage", help="QLoRA: the bnb_4bit_quant_storage dtype you use (e.g. bfloat16)")
    p.set_defaults(func=cmd_check)


def _site(args, plan):
    from shardtrain.emit.bundle import Site
    run_dir = args.run_dir or (str(Path(args.out).absolute()) if args.out else "RUN_DIR")
    hosts = tuple(h.strip() for h in (args.hosts or "").split(",") if h.strip())
    return Site(run_dir=run_dir, hosts=hosts, master_addr=args.master_addr, port=args.master_port)


_HF_FORMAT_RUNNER = {"trainer": "hf_trainer", "trainer-args": "hf_trainer", "accelerate": "accelerate"}
"""emit --format -> the runner the plan is made for (train.runner)."""


def cmd_emit(args: argparse.Namespace) -> int:
    from shardtrain.compiler.planner import NoFitError
    from shardtrain.config.flags import parse_sets
    from shardtrain.config.pipeline import compile_args
    from shardtrain.emit.bundle import bundle, render
    if not args.out and not args.format:
        print("shardtrain: error: give --out DIR (write every file) or --format FMT (print one)", file=sys.stderr)
        return EXIT_ERROR
    # a format for the HF Trainer / accelerate plans for that runner's loss path (compiler/runner.py) unless
    # --runner / --set train.runner says otherwise
    runner = _HF_FORMAT_RUNNER.get(args.format or "")
    if runner and getattr(args, "runner", None) is None and "train.runner" not in parse_sets(getattr(args, "sets", ())):
        args.runner = runner
    try:
        cfg, plan = compile_args(args)
    except NoFitError as e:
        print(f"shardtrain: {e}\nNothing emitted: a config for a plan that does not fit would OOM.", file=sys.stderr)
        return EXIT_NO_FIT
    site = _site(args, plan)
    try:
        if args.format:
            sys.stdout.write(render(args.format, plan, site, cfg))
            if args.format in ("deepspeed", "trainer", "trainer-args", "fsdp"):  # JSON has no comments: say it here
                from shardtrain.emit.accelerate import memory_saver_notes
                for note in memory_saver_notes(plan):
                    print(f"note: {note}", file=sys.stderr)
        if args.out:
            files = bundle(plan, site, cfg)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (out / name).write_text(text)
            os.chmod(out / "launch.sh", 0o755)
            print(f"{plan.strategy.value}: wrote {', '.join(files)} to {out}", file=sys.stderr)
            print(f"{_lr_line(plan, cfg)}; what your own script must do: {out / 'README.md'}", file=sys.stderr)
    except ValueError as e:
        print(f"shardtrain: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def _lr_line(plan, cfg) -> str:
    """The learning rate every emitted file carries, and whether it is the method's default (what train.lr: auto
    gives; the loaded config no longer says whether the user wrote auto or the same number)."""
    from shardtrain.config.schema import default_lr
    lr, d = cfg.train.lr, default_lr(plan.chosen.method)
    return f"learning rate {lr:g}" + (f" (the {plan.chosen.method.value} default; set train.lr to change it)"
                                      if lr == d else "")


def _derived_overrides(kind: str, data: dict) -> dict[str, object]:
    """Run-config overrides that make the plan describe what the checked file does."""
    from shardtrain.emit import deepspeed as K
    o: dict[str, object] = {}
    if kind == "accelerate":
        n, m = data.get("num_processes"), data.get("num_machines") or 1
        if isinstance(n, int) and n > 0:
            o.update({"hardware.nodes": m, "hardware.gpus_per_node": n // m})
        dt = data.get("distributed_type")
        if dt == "FSDP":
            f = data.get("fsdp_config") or {}
            # the mesh as written: HSDP (the old fsdp_hybrid_shard) is dp_replicate > 1 on FSDP
            o["train.strategy"] = ("fsdp_shard_grad_op" if f.get("fsdp_reshard_after_forward") is False else
                                   "fsdp_offload" if f.get("fsdp_offload_params") is True else "fsdp_full_shard")
            pc = data.get("parallelism_config") or {}
            for dim in ("dp_replicate", "dp_shard", "tp", "cp"):
                v = pc.get(f"parallelism_config_{dim}_size") if isinstance(pc, dict) else None
                if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
                    o[f"parallel.{dim}"] = v
            if isinstance(o.get("parallel.cp"), int) and o["parallel.cp"] > 1:
                o["parallel.cp_mode"] = "ring"  # accelerate's cp is torch's context_parallel
        elif dt in ("MULTI_GPU", "NO"):
            o["train.strategy"] = "ddp"
        mp = data.get("mixed_precision")
        if mp in ("bf16", "fp16"):
            o["train.precision"] = mp
        return o
    z = data.get(K.ZERO) or {}
    stage = z.get(K.STAGE, 0)
    dev = lambda b: (z.get(b) or {}).get(K.DEVICE, "none") if isinstance(z.get(b), dict) else "none"  # noqa: E731
    if stage == 3:
        o["train.strategy"] = ("zero_infinity" if "nvme" in (dev(K.OFFLOAD_PARAM), dev(K.OFFLOAD_OPTIMIZER)) else
                               "zero3_offload" if dev(K.OFFLOAD_PARAM) == "cpu"
                               else "zero3_opt_offload" if dev(K.OFFLOAD_OPTIMIZER) == "cpu" else "zero3")
    elif stage in (1, 2):
        o["train.strategy"] = "zero2_offload" if dev(K.OFFLOAD_OPTIMIZER) != "none" else f"zero{stage}"
    else:
        o["train.strategy"] = "ddp"
    sizes = K.mesh_sizes(data)
    sp, tp = sizes[K.SEQUENCE_PARALLEL_SIZE], sizes[K.AUTOTP_SIZE]
    sp = sp if isinstance(sp, int) and not isinstance(sp, bool) and sp >= 1 else 1
    tp = tp if isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1 else 1
    o.update({"parallel.cp": sp, "parallel.tp": tp})
    if sp > 1:
        o["parallel.cp_mode"] = "ulysses"  # DeepSpeed's sequence parallel
    if isinstance(data.get(K.MICRO_BATCH), int):
        o["train.micro_batch"] = data[K.MICRO_BATCH]
    if isinstance(data.get(K.TRAIN_BATCH_SIZE), int):
        # DeepSpeed counts each AutoTP rank in train_batch_size (deepspeed.batch_world); samples = that / tp
        o["train.global_batch"] = data[K.TRAIN_BATCH_SIZE] // tp
    if (data.get(K.BF16) or {}).get(K.ENABLED) is True:
        o["train.precision"] = "bf16"
    elif (data.get(K.FP16) or {}).get(K.ENABLED) is True:
        o["train.precision"] = "fp16"
    return o


def _qlora_from_bundle(args, path: Path) -> None:
    """A file of an emitted QLoRA bundle: the quant storage (and method) come from bnb_config.json beside it,
    so `check` judges the file with the settings the user's script loads the model with."""
    from shardtrain.emit.check_hf import sibling
    from shardtrain.emit.trainer import BNB_CONFIG_JSON
    bnb = sibling(path, BNB_CONFIG_JSON)
    if bnb is None or args.quant_storage:
        return
    import json
    try:
        d = json.loads(bnb.read_text())
    except (OSError, ValueError):
        return
    if isinstance(d, dict) and d.get("load_in_4bit"):
        args.quant_storage = str(d.get("bnb_4bit_quant_storage") or "uint8").replace("torch.", "")
        args.method = args.method or "qlora"


def cmd_check(args: argparse.Namespace) -> int:
    """Each FILE checked on its own (a bundle's files: `check BUNDLE/*`); exit 1 if any has errors, else 2
    if any setup does not fit, else 0."""
    codes = [_check_file(argparse.Namespace(**{**vars(args), "file": f})) for f in args.files]
    return EXIT_ERROR if EXIT_ERROR in codes else max(codes)


def _check_file(args: argparse.Namespace) -> int:
    import json

    from shardtrain.emit.check import (ERROR, INFO, Finding, auto_allowed, check_accelerate, check_deepspeed,
                                       find_auto_keys, load_any, looks_like_trainer_template)
    from shardtrain.emit.check_bundle import check_other
    try:
        kind, data = load_any(args.file)
    except (OSError, ValueError) as e:
        from shardtrain.cli import one_line
        print(f"shardtrain: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    path = Path(args.file)
    _qlora_from_bundle(args, path)
    world = args.nodes * args.gpus_per_node if args.nodes and args.gpus_per_node else args.gpus_per_node
    wrap = heads = None
    model_given = bool(args.config or args.model or args.params)
    if kind in ("accelerate", "fsdp settings", "deepspeed") and args.model:
        from shardtrain.config.presets import load_model_spec
        from shardtrain.emit.fsdp import transformers_layer_class
        spec = load_model_spec(args.model)
        wrap = (transformers_layer_class(spec.model_type) or (spec.decoder_layer_class,))[0]
        heads = (spec.num_heads, spec.num_kv_heads)  # the mesh's tp / Ulysses sp must divide them
    notes = []
    if kind == "deepspeed":
        target = args.target if args.target != "auto" else ("trainer" if looks_like_trainer_template(data)
                                                             else "deepspeed")
        findings = check_deepspeed(data, consumer=target, world_size=world, optimizer=args.optimizer,
                                   method=args.method, quant_storage=args.quant_storage, heads=heads)
        if target == "trainer":
            fills = auto_allowed("trainer")
            filled = [k for k in find_auto_keys(data) if k in fills]
            why = "" if args.target == "trainer" else ' ("auto" values found; --target deepspeed to check it as a ' \
                'plain DeepSpeed config)'
            notes.append(Finding(INFO, "<top level>", f"checked as an HF Trainer template{why}",
                                 "the Trainer fills: " + (", ".join(f"{k} <- {fills[k]}" for k in filled) or "nothing")))
    elif kind == "accelerate":
        findings = check_accelerate(data, base_dir=path.parent, method=args.method,
                                    quant_storage=args.quant_storage, optimizer=args.optimizer, wrap_class=wrap,
                                    heads=heads)
    else:
        findings = check_other(kind, data, path, world_size=world, wrap_class=wrap)
        model_given = False  # the fit verdict is for engine configs (their strategy and batch)
    if args.json:
        for f in notes + findings:
            print(json.dumps(f.to_json(args.file)))
    else:
        for f in notes + findings:
            print(f"{args.file}: {f}")
    errors = sum(f.severity == ERROR for f in findings)
    if not findings and not args.json:
        print(f"{args.file}: ok ({getattr(kind, 'value', kind)})")
    code = EXIT_ERROR if errors else EXIT_OK
    if model_given:
        if args.json:  # keep stdout one JSON object per line: the fit verdict becomes one more object
            import contextlib
            import io
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                fit = _fit(args, kind, data)
            for line in buf.getvalue().splitlines():
                sev = INFO if fit == EXIT_OK else ERROR
                print(json.dumps(Finding(sev, "<fit>", line.removeprefix("fit: "), "").to_json(args.file)))
        else:
            fit = _fit(args, kind, data)
        if fit is not None and code == EXIT_OK:
            code = fit
    return code


def _fit(args, kind: str, data: dict) -> int | None:
    from shardtrain.compiler.planner import NoFitError, PlanningError
    from shardtrain.config import pipeline
    from shardtrain.config.flags import overrides_from_args
    from shardtrain.config.schema import ConfigError
    from shardtrain.units import fmt_bytes
    o = {**_derived_overrides(kind, data), **overrides_from_args(args)}
    try:
        _, p = pipeline.compile(args.config, o)
    except NoFitError as e:
        p = e.plan
    except (ConfigError, PlanningError) as e:
        print(f"fit: cannot plan this file's setup: {e}")
        return EXIT_ERROR
    c = p.chosen
    usable = p.gpu_memory_bytes - p.headroom_bytes
    verdict = "fits" if c.fits else "does NOT fit"
    print(f"fit: {c.strategy.value}, mesh {c.mesh.label()}, micro batch {c.micro_batch_size}, checkpointing "
          f"{c.gradient_checkpointing.value}: "
          f"{verdict}: {fmt_bytes(c.gpu_need_bytes)} per GPU of {fmt_bytes(usable)} usable"
          + ("" if c.fits else "; " + "; ".join(c.why_not)))
    return EXIT_OK if c.fits else EXIT_NO_FIT
