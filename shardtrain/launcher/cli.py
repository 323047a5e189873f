"""`shardtrain launch RUN.yaml`: compile the plan, prepare the run dir, run torchrun or the deepspeed launcher.

    shardtrain launch configs/examples/tiny-cpu.yaml                 # the main job (2 CPU processes)
    shardtrain launch RUN.yaml --launcher deepspeed --dry-run        # print what would run
    shardtrain launch RUN.yaml --plan plan.json                      # a plan compiled before
    shardtrain launch RUN.yaml --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400   # on each node
    shardtrain launch RUN.yaml --trainer-args -- python train.py --output_dir out   # your own script

Your own script (everything after `--`): every rank runs it under the plan's launcher (torchrun, or the
deepspeed launcher for ZeRO plans) with the plan in accelerate's environment (ACCELERATE_USE_FSDP,
FSDP_VERSION=2, ACCELERATE_USE_DEEPSPEED + the run dir's hf_ds_config.json, ACCELERATE_MIXED_PRECISION;
ACCELERATE_USE_CPU on CPU ranks), so an unmodified Accelerator() or HF Trainer picks it up. --trainer-args
also appends the plan's TrainingArguments flags (--per_device_train_batch_size, --gradient_accumulation_steps,
--gradient_checkpointing, --bf16/--fp16, --deepspeed FILE, --use_cpu on CPU) after your arguments, for
scripts that parse them with HfArgumentParser (HF examples, TRL); --dry-run shows them. The run dir, logs,
restarts (--max-restarts restarts your script), --timeout and exit codes are as for our worker; checkpoints,
resume, metrics, evaluation, --on-oom re-planning and the data checks are your script's business. On CPU,
accelerate runs FSDP plans as plain DDP (it has no CPU FSDP), and ZeRO plans only through the Trainer with
--trainer-args (--use_cpu --deepspeed FILE).

Exit codes: 0 ok; 1 a rank or the launcher failed (its traceback is shown once); 2 the plan does not
fit; 75 pre-empted: a worker got SIGTERM/SIGINT/SIGUSR1/SIGUSR2, every rank saved a checkpoint at the
next step and stopped (run the same command to resume); 124 --timeout; 130/143 interrupted by
SIGINT/SIGTERM (run the same command to resume).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from shardtrain import rundir_format as rf  # noqa: E402
from shardtrain.exitcodes import EXIT_ERROR, EXIT_NO_FIT, EXIT_OK  # noqa: E402


def add_parsers(subparsers) -> None:
    from shardtrain.compiler.specs import Launcher
    from shardtrain.config.flags import add_plan_flags
    p = subparsers.add_parser(
        "launch", help="compile the plan, prepare a run dir and start torchrun / the deepspeed launcher",
        description="Compile the plan (or take --plan), write the run dir (run.yaml, plan.json, engine config, "
                    "command.txt, logs/, checkpoints/) and start the per-rank worker under torchrun or the "
                    "deepspeed launcher. Without GPUs it runs N CPU processes on gloo.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_plan_flags(p)
    g = p.add_argument_group("launch")
    g.add_argument("--plan", metavar="PLAN.json", help="use this plan (from `plan --json --full-json` or a run dir's "
                   "plan.json) instead of compiling one")
    g.add_argument("--launcher", choices=[v.value for v in Launcher if v is not Launcher.AUTO],
                   help="default: run.launcher, else deepspeed for ZeRO plans and torchrun otherwise")
    g.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="processes per node (default: hardware.gpus_per_node; the plan is compiled for it)")
    g.add_argument("--nnodes", type=int, metavar="N", help="nodes (default: hardware.nodes)")
    g.add_argument("--node-rank", type=int, metavar="R", help="this node's rank (multi-node)")
    g.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="multi-node: node 0's address (torchrun c10d rendezvous / deepspeed master)")
    g.add_argument("--master-port", type=int, metavar="PORT",
                   help="port for the rendezvous/master (default: a free one on a single node)")
    g.add_argument("--run-dir", metavar="DIR", help="default: <run.output_dir>/<run.name or config file name>")
    g.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help="continue from the run dir's latest checkpoint (default, unless run.resume: never)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start fresh: move the run dir's checkpoints/metrics/logs to previous/<time>/")
    g.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="torchrun: restart all workers up to N times after a failure (they resume)")
    g.add_argument("--min-nodes", type=int, default=None, metavar="M",
                   help="elastic: when nodes are lost for good, a restart goes on with M or more (torchrun --nnodes "
                        "M:N; plans for the smaller worlds are compiled first; needs --max-restarts)")
    g.add_argument("--on-oom", metavar="replan[:N]", default=None,
                   help="when a rank runs out of memory: re-plan (smaller micro batch with more accumulation, then "
                        "checkpointing) and resume, at most N times (default 2); default: fail")
    g.add_argument("--oversubscribe", action="store_true", default=None,
                   help="CPU runs: allow more ranks than CPU cores (= --set run.oversubscribe=true), e.g. a "
                        "4-rank mesh on a 2-core machine")
    g.add_argument("--dry-run", action="store_true", help="print the plan, the run dir and the exact command; "
                   "write and run nothing")
    g.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the workers after this long (exit 124)")
    g.add_argument("--trainer-args", action="store_true",
                   help="with `-- python train.py ...`: append the plan's TrainingArguments flags (micro batch, "
                        "accumulation, checkpointing, precision, --deepspeed, --use_cpu) to your script's arguments")
    g.add_argument("--worker-module", default=None, help=argparse.SUPPRESS)  # tests: a stand-in worker
    p.set_defaults(func=cmd_launch)
    take_user_command(p)


class _UserCommandParser(argparse.ArgumentParser):
    """Everything after the first ``--`` is the user's command (``args.user_command``), not ours."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        command: list[str] | None = None  # None: no `--` at all; []: `--` with nothing after it (refused)
        if "--" in args:
            i = args.index("--")
            args, command = args[:i], args[i + 1:]
        ns, extras = super().parse_known_args(args, namespace)
        ns.user_command = command
        return ns, extras


def take_user_command(p: argparse.ArgumentParser) -> None:
    """Make subcommand parser ``p`` read ``... -- COMMAND ARGS`` into ``args.user_command`` (launch, sbatch);
    it keeps its own class (the root's did-you-mean parser) as the base."""
    if not isinstance(p, _UserCommandParser):
        p.__class__ = type("UserCommandParser", (_UserCommandParser, type(p)), {})


def _launch_overrides(args) -> dict[str, object]:
    from shardtrain.config.flags import overrides_from_args
    from shardtrain.config.schema import ConfigError
    ov = overrides_from_args(args)
    for flag, key in (("nnodes", "hardware.nodes"), ("nproc_per_node", "hardware.gpus_per_node")):
        v = getattr(args, flag)
        if v is None:
            continue
        if v < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: {v} must be >= 1")
        if key in ov and int(ov[key]) != v:
            raise ConfigError(f"--{flag.replace('_', '-')} {v} contradicts {key}={ov[key]}; give one of them")
        ov[key] = v
    if getattr(args, "oversubscribe", None):
        ov["run.oversubscribe"] = "true"
    return ov


def _config_for_plan_only(p) -> dict:
    """A run config for `launch --plan plan.json` without a YAML: the plan's model and hardware."""
    m, hw, t = p.model, p.hardware, p.train
    model = {"name": m.name} if m.name and m.name != "custom" else {
        "params": m.num_params, "hidden": m.hidden_size, "layers": m.num_layers, "heads": m.num_heads,
        "kv_heads": m.num_kv_heads, "vocab": m.vocab_size, "intermediate": m.intermediate_size}
    return {"model": model,
            "hardware": {"nodes": hw.nodes, "gpus_per_node": hw.gpus_per_node, "gpu": hw.gpu_name,
                         "gpu_memory": hw.gpu_memory_bytes, "nvme_path": hw.nvme_path},
            "train": {"seq_len": t.seq_len, "global_batch": t.global_batch_size,
                      "micro_batch": p.chosen.micro_batch_size, "precision": p.chosen.precision.value,
                      "method": p.chosen.method.value, "optimizer": p.chosen.optimizer.value,
                      "strategy": p.strategy.value}}


def _check_nodes(cfg, args) -> None:
    from shardtrain.config.schema import ConfigError
    nnodes = cfg.hardware.nodes
    if nnodes > 1 and args.node_rank is None:
        raise ConfigError(f"hardware.nodes is {nnodes}: run `shardtrain launch` on every node with --node-rank "
                          "(0 on the first) and the same --rdzv-endpoint HOST:PORT (node 0's address)")
    if nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError(f"hardware.nodes is {nnodes}: give --rdzv-endpoint HOST:PORT (node 0's address)")
    if args.node_rank is not None and not 0 <= args.node_rank < nnodes:
        raise ConfigError(f"--node-rank {args.node_rank} must be in [0, {nnodes})")


def cmd_launch(args) -> int:
    from shardtrain.compiler.plan import Plan
    from shardtrain.compiler.planner import NoFitError
    from shardtrain.compiler.specs import Device, Launcher, Resume
    from shardtrain.config import pipeline
    from shardtrain.config.schema import ConfigError
    from shardtrain.launcher import hosts, rankstart, restart, rundir, supervise
    from shardtrain.launcher.failure import rel
    from shardtrain.launcher.datacheck import validate_training_data
    from shardtrain.report import render_plan

    from shardtrain.launcher import oom
    try:
        oom.parse_on_oom(args.on_oom)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    command = getattr(args, "user_command", None)
    if command is not None and not command:
        raise ConfigError("the command after `--` is empty; write e.g. `shardtrain launch RUN.yaml -- python train.py "
                          "ARGS`")
    command = list(command or [])
    if command and args.on_oom:
        raise ConfigError("--on-oom re-plans and resumes our worker; with your own script (`-- ...`) drop it")
    if args.trainer_args and not command:
        raise ConfigError("--trainer-args adds TrainingArguments flags to your own script: give it after `--`, "
                          "e.g. `-- python train.py --output_dir out`")
    overrides = _launch_overrides(args)
    if args.plan:
        from shardtrain.config.safe_io import load_mapping
        fix = "write one with `shardtrain plan ... --json --full-json > plan.json`"
        raw_plan = load_mapping(args.plan, fmt="json", what="--plan", fix=fix)
        try:
            plan = Plan.from_json(raw_plan)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
            raise ConfigError(f"--plan {args.plan}: cannot read a full plan ({type(e).__name__}: {e}); write one "
                              "with `shardtrain plan ... --json --full-json > plan.json`") from None
        cfg = pipeline.load(args.config if args.config else _config_for_plan_only(plan), overrides)
        rundir.check_plan_matches(cfg, plan)
        _check_nodes(cfg, args)
    else:
        cfg = pipeline.load(args.config, overrides)
        _check_nodes(cfg, args)  # before planning: a multi-node launch without its flags fails fast
        try:
            plan = pipeline.plan_for(cfg)
        except NoFitError as e:
            print(render_plan(e.plan))
            print(f"\nshardtrain: error: {e}", file=sys.stderr)
            return EXIT_NO_FIT
    print(render_plan(plan), flush=True)
    if not plan.chosen.fits:
        print(f"\nshardtrain: error: the {plan.strategy.value} plan does not fit "
              f"({'; '.join(plan.chosen.why_not) or 'over the GPU memory'}); choose another --strategy or change "
              "the job", file=sys.stderr)
        return EXIT_NO_FIT
    if not command:  # own scripts read their own data
        validate_training_data(cfg)  # issue 12: bad data is refused before any worker starts

    nnodes, nproc = cfg.hardware.nodes, cfg.hardware.gpus_per_node
    try:
        gpus, device = hosts.local_devices(cfg.run.device)
        launcher = rankstart.choose_launcher(args.launcher, cfg, plan)
        launcher = restart.launcher_for_restarts(args.launcher, launcher, args.max_restarts)
        from shardtrain.launcher import elastic  # --min-nodes (issue 21: scale down on node loss)
        elastic.check(args.min_nodes, nnodes, args.max_restarts)
        launcher = elastic.launcher_for(args.launcher, launcher, args.min_nodes, nnodes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if device == Device.CUDA and nproc > gpus:
        raise ConfigError(f"the plan runs {nproc} processes per node but {gpus} GPU(s) are visible here; pass "
                          f"--nproc-per-node {gpus} (the plan is recompiled for it) or set run.device: cpu")
    run_dir = Path(args.run_dir).absolute() if args.run_dir else rundir.default_run_dir(cfg, args.config)
    master_port = args.master_port
    if master_port is None and launcher == Launcher.DEEPSPEED and nnodes == 1 and not args.rdzv_endpoint:
        master_port = rankstart.free_port()  # the deepspeed launcher's default 29500 collides between runs
    own = _own_script(command, plan, cfg, run_dir, device, args.trainer_args) if command else None
    launch_kw = dict(  # kept: an OOM re-plan launches again with only another log dir
        run_dir=run_dir, launcher=launcher, nproc_per_node=nproc, nnodes=nnodes, node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint, master_port=master_port, max_restarts=args.max_restarts, gpus=gpus,
        min_nnodes=args.min_nodes, expandable_segments=plan.hardware.expandable_segments,
        device=device, cpu_count=hosts.cpu_count(), environ=dict(os.environ), progress=None if command else True,
        extra_env={**hosts.ops_env(), **(own.env if own else {})},
        **({"module": args.worker_module} if args.worker_module else {}),
        **(dict(entry=own.entry, files=own.files, python=_interpreter(own.python)) if own else {}))
    try:
        spec = rankstart.build_launch(**launch_kw)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    resume = args.resume if args.resume is not None else cfg.run.resume is not Resume.NEVER
    from shardtrain.launcher import preflight  # the plan against this machine, before spawning (issue 13)
    pf = preflight.check(cfg, plan, machine=preflight.this_machine(gpus), device=device, nproc=nproc,
                         run_dir=run_dir, master_port=args.master_port,
                         node_rank=args.node_rank or 0, entry=own.entry if own else None)
    for note in pf.notes:
        print(f"[shardtrain] {note}", flush=True)
    for line in pf.problems:
        print(f"shardtrain: error: preflight: {line}", file=sys.stderr, flush=True)
    if pf.problems and not args.dry_run:
        print(f"shardtrain: {len(pf.problems)} preflight problem(s): nothing was started", file=sys.stderr)
        return EXIT_ERROR

    if args.dry_run:
        state = rundir.has_state(run_dir) if run_dir.is_dir() else False
        print(f"\n[shardtrain] dry run: {spec.describe()}")
        print(f"[shardtrain] run dir {run_dir} "
              + ("(exists; would resume from its checkpoints)" if state and resume else
                 "(exists; would move its state to previous/)" if state else "(would be created)"))
        files = rundir.run_file_names(cfg, plan) + list(own.files if own else ())
        print(f"[shardtrain] would write: {', '.join(files)}; logs in {spec.log_dir}")
        if own and own.trainer_args:
            print(f"[shardtrain] --trainer-args appends to your arguments: {' '.join(own.trainer_args)}")
        print("[shardtrain] would run:\n")
        print(spec.script(), end="")
        return EXIT_OK

    prepared = rundir.write_run_dir(run_dir, cfg, plan, command_text=spec.script(), resume=resume,
                                    move_aside=spec.node_rank == 0)
    for line in elastic.write_plans(run_dir, cfg, args.min_nodes):
        print(f"[shardtrain] --min-nodes {args.min_nodes}: {line}", flush=True)
    done = rf.completed_steps(run_dir) if prepared.has_state and not own else 0
    if not own and done >= cfg.train.steps and (run_dir / rf.FINAL).exists():
        print(f"\n[shardtrain] {rel(run_dir)} already finished {done} of {cfg.train.steps} steps: nothing to "
              "run. Train longer with --steps N (it resumes), or start over with --no-resume.", flush=True)
        return EXIT_OK
    print(f"\n[shardtrain] {spec.describe()}" + (", every rank running your command" if own else ""), flush=True)
    note = (" (resuming from its latest checkpoint)" if prepared.has_state else
            f" (previous state moved to {prepared.moved_aside})" if prepared.moved_aside else "")
    print(f"[shardtrain] run dir {rel(run_dir)}{note}; rank logs in {rel(spec.log_dir)}", flush=True)
    print(f"[shardtrain] $ {spec.shell()}\n", flush=True)
    result = supervise.run(spec, timeout=args.timeout)
    for line in restart.restart_report(spec, args.max_restarts):
        print(line, flush=True)
    result = _replan_on_oom(args, cfg, plan, spec, launch_kw, result, run_dir)
    stream = sys.stdout if result.returncode == 0 else sys.stderr
    print(result.summary, file=stream, flush=True)
    return result.returncode


def _own_script(command, plan, cfg, run_dir: Path, device, trainer_args: bool):
    """ownscript.own_script for the CLI: its one-line errors become ConfigError."""
    from shardtrain.config.schema import ConfigError
    from shardtrain.launcher import ownscript
    try:
        return ownscript.own_script(command, plan, cfg, run_dir=str(run_dir), device=str(getattr(device, "value", device)),
                                    trainer_args=trainer_args, environ=dict(os.environ))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _interpreter(python: str | None) -> str | None:
    """The interpreter the user's command names, resolved on PATH (its virtualenv runs the launcher too, so
    the ranks import the user's packages); None (another program): this interpreter runs the launcher."""
    import shutil
    from shardtrain.config.schema import ConfigError
    if python is None:
        return None
    found = shutil.which(python)
    if not found:
        raise ConfigError(f"the command after `--` names `{python}`, which is not on PATH; give the interpreter's "
                          f"path (e.g. -- {sys.executable} train.py)")
    return os.path.abspath(found)


def _replan_on_oom(args, cfg, plan, spec, launch_kw: dict, result, run_dir: Path):
    """--on-oom replan[:N]: after a launch that ran out of memory, re-plan and launch again (launcher/oom.py)."""
    from shardtrain.launcher import oom, rankstart, rundir, supervise
    first_log_dir = spec.log_dir
    budget = oom.parse_on_oom(args.on_oom)
    for i in range(1, budget + 1):
        records = oom.oom_records(run_dir)
        if result.returncode == 0 or not records:
            return result
        nxt = oom.next_plan(cfg, plan, records)
        if nxt is None:
            print(f"[shardtrain] out of memory and nothing smaller to re-plan to (micro batch "
                  f"{plan.chosen.micro_batch_size}, checkpointing {plan.chosen.gradient_checkpointing.value})",
                  file=sys.stderr, flush=True)
            return result
        print(f"\n[shardtrain] re-plan {i} of {budget}: {nxt.message}", flush=True)
        cfg, plan = nxt.cfg, nxt.plan
        oom.clear_records(run_dir)
        oom.accept_new_split(run_dir, cfg, plan)
        spec = rankstart.build_launch(**launch_kw, log_dir=f"{first_log_dir}-replan{i}")
        rundir.write_run_dir(run_dir, cfg, plan, command_text=spec.script(), resume=True,
                             move_aside=spec.node_rank == 0)
        result = supervise.run(spec, timeout=args.timeout)
    return result
