"""``shardtrain sbatch``: prepare the run dir, render the batch script, optionally submit it.

Wire into the root parser with ``add_sbatch_parser(subparsers)``; the handler is ``sbatch_cli``.
``python -m shardtrain.slurm.cli prepare RUN.yaml --run-dir DIR [--set k=v]`` is what a rendered
script runs (in the batch shell, before any worker) when its run dir has no ``plan.json`` yet;
``python -m shardtrain.slurm.cli examples`` regenerates ``slurm/*.sbatch`` from
``configs/examples/*.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from shardtrain.launcher.rankstart import LAUNCHERS
from shardtrain.slurm.job import SbatchJob
from shardtrain.slurm.script import render

__all__ = ["add_sbatch_parser", "sbatch_cli", "build_job", "main"]


def _prepare(config: str, overrides: Sequence[str], run_dir: Path, command_file: Optional[str] = None) -> Path:
    """``prepare``: what a rendered script runs on the compute node (the same overrides, the same plan).
    ``command_file``: the job's batch script (``$0`` in the batch shell), recorded as command.txt."""
    from shardtrain.config.flags import parse_sets
    from shardtrain.launcher.rundir import prepare_run_dir  # lazily: rendering needs no compiler
    command_text = None
    if command_file:
        try:
            command_text = Path(command_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:  # a job run by hand (`bash < job.sbatch`): $0 is no file
            print(f"[shardtrain] cannot read the batch script {command_file!r} ({exc.__class__.__name__}); "
                  "command.txt describes the plan's launch instead", file=sys.stderr)
    return Path(prepare_run_dir(config, parse_sets(overrides), run_dir, command_text=command_text))


def add_sbatch_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``sbatch`` subcommand to an ``argparse`` subparsers object and return it."""
    p = subparsers.add_parser(
        "sbatch",
        help="render a Slurm batch script for a run (and submit it with --submit)",
        description=(
            "Prepare the run directory (run.yaml, plan.json, ds_config.json), render a complete "
            "batch script (one launcher per node, c10d rendezvous or the deepspeed launcher, "
            "checkpoint + requeue on the early-warning signal) and print it, write it (--script), "
            "or submit it (--submit, prints the job id)."
        ),
    )
    add_sbatch_arguments(p)
    p.set_defaults(func=sbatch_cli)
    from shardtrain.launcher.cli import take_user_command
    take_user_command(p)  # `-- python train.py ARGS`: the user's own script on every rank
    return p


def add_sbatch_arguments(p: argparse.ArgumentParser) -> None:
    # the same flag set as plan/emit/check/launch (config, --set, --model, --seq-len, --nodes, ...)
    from shardtrain.config.flags import add_plan_flags
    add_plan_flags(p)
    p.add_argument("--run-dir", help="run directory (default: <run.output_dir>/<run.name>)")
    p.add_argument("--launcher", choices=LAUNCHERS,
                   help="default: run.launcher, else deepspeed when the plan uses DeepSpeed")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 04:00:00")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--mem", help="memory per node, e.g. 0 (all) or 500G (default: the plan's host RAM per "
                                 "node + 25%%, slurm/resources.py)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs of the one launcher task per node, shared by its "
                                                     "ranks (default: 8 per rank, slurm/resources.py)")
    p.add_argument("--output", help="Slurm log file (default: <run-dir>/slurm-%%j.out)")
    p.add_argument("--job-name", help="default: the run directory's name")
    p.add_argument("--no-gpu-request", dest="request_gpus", action="store_false",
                   help="do not render --gpus-per-node (CPU-only partitions)")
    p.add_argument("--signal", default="USR2", help="early-warning signal (default USR2)")
    p.add_argument("--signal-seconds", type=int, default=90,
                   help="send it this many seconds before the time limit (default 90)")
    p.add_argument("--max-requeues", type=int, help="default: run.max_requeues")
    p.add_argument("--min-nodes", type=int, metavar="M",
                   help="scale-down: #SBATCH --nodes=M-N; a job started or requeued on fewer nodes re-plans its run "
                        "dir for them and resumes from the last checkpoint (torchrun)")
    p.add_argument("--python", default=None,
                   help="python on the compute nodes (default: this interpreter)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the job (repeatable)")
    p.add_argument("--script", metavar="PATH",
                   help="write the script here (default: print it; with --submit: RUN_DIR/job.sbatch)")
    p.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
    p.add_argument("--trainer-args", action="store_true",
                   help="with `-- python train.py ...`: append the plan's TrainingArguments flags (as `launch`)")


#: sbatch flags that are SbatchJob fields as they are (same name, same value).
_AS_IS = ("partition", "time", "account", "qos", "constraint", "exclusive", "output", "signal", "signal_seconds")


def build_job(args: argparse.Namespace, run_dir: Path, cfg, plan, overrides: Sequence[str]) -> SbatchJob:
    """The SbatchJob for parsed ``args``, the compiled config and plan, and the ``run_dir`` to prepare.
    Nodes and processes per node are the plan's (the YAML's hardware, or --nodes/--gpus-per-node);
    --cpus-per-task and --mem default to what the plan needs (slurm/resources.py). Without a YAML
    (flags only) a job that must re-prepare its run dir does it from the run dir's own run.yaml."""
    from shardtrain import rundir_format as rf
    from shardtrain.compiler.specs import Device
    from shardtrain.launcher.rankstart import choose_launcher, entry_argv
    from shardtrain.slurm import resources
    max_requeues = args.max_requeues
    if max_requeues is None:
        max_requeues = cfg.run.max_requeues
    env = []
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--env {item!r}: write NAME=VALUE")
        env.append((name, value))
    request_gpus = args.request_gpus and cfg.run.device != Device.CPU
    launcher = choose_launcher(args.launcher, cfg, plan)
    min_nodes = getattr(args, "min_nodes", None)
    if min_nodes is not None:  # issue 21: torchrun's elastic node range (the deepspeed launcher has none)
        from shardtrain.launcher import elastic
        launcher = elastic.launcher_for(args.launcher, launcher, min_nodes, cfg.hardware.nodes)
    own = _own_script(args, cfg, plan, run_dir, device="cuda" if request_gpus else "cpu")
    if own is not None:  # accelerate's variables first: the user's --env wins
        env = [*own.env.items(), *env]
    return SbatchJob(
        run_dir=str(run_dir),
        nodes=cfg.hardware.nodes,
        min_nodes=min_nodes,
        gpus_per_node=cfg.hardware.gpus_per_node,
        launcher=launcher,
        job_name=args.job_name or run_dir.name,
        config=str(Path(args.config).absolute()) if args.config else str(run_dir / rf.RUN_YAML),
        overrides=tuple(overrides) if args.config else (),  # run.yaml already holds them
        python=args.python or (own.python if own is not None and own.python else sys.executable),
        max_requeues=max_requeues,
        env=tuple(env),
        expandable_segments=plan.hardware.expandable_segments,
        user_command=tuple(entry_argv(launcher, own.entry)) if own is not None else (),
        request_gpus=request_gpus,
        cpus_per_task=args.cpus_per_task if args.cpus_per_task is not None else resources.cpus_per_task(plan),
        mem=args.mem if args.mem is not None else resources.mem_per_node(plan, on_cpu=not request_gpus),
        **{name: getattr(args, name) for name in _AS_IS},
    )


def _own_script(args: argparse.Namespace, cfg, plan, run_dir: Path, device: str):
    """The user's command after `--` (launcher/ownscript.py), or None for our worker."""
    command = getattr(args, "user_command", None)
    if command is not None and not command:
        raise ValueError("the command after `--` is empty; write e.g. `-- python train.py ARGS`")
    command = list(command or [])
    if getattr(args, "trainer_args", False) and not command:
        raise ValueError("--trainer-args adds TrainingArguments flags to your own script: give it after `--`")
    if not command:
        return None
    from shardtrain.launcher.ownscript import own_script
    return own_script(command, plan, cfg, run_dir=str(run_dir), device=device,
                      trainer_args=getattr(args, "trainer_args", False), environ={})


def _effective_overrides(args: argparse.Namespace) -> list[str]:
    """The plan flags (--model, --seq-len, --nodes, ...) and --set pairs as KEY=VALUE strings
    (config/flags.py): the run dir is prepared with them, and a job that finds no plan.json re-prepares
    with the same ones. --nodes/--gpus-per-node are overrides like any other: without them the YAML's
    hardware.nodes/hardware.gpus_per_node hold; without a YAML, the flags alone are the config."""
    from shardtrain.config.flags import overrides_from_args
    return [f"{k}={'null' if v is None else v}" for k, v in overrides_from_args(args).items()]


def sbatch_cli(args: argparse.Namespace) -> int:
    """Handler of ``shardtrain sbatch``; returns the exit code."""
    from shardtrain.compiler.specs import Resume
    from shardtrain.config import pipeline
    from shardtrain.config.flags import parse_sets
    from shardtrain.launcher import rundir
    overrides = _effective_overrides(args)
    # compiled once, from the very strings the compute nodes will re-prepare with (the same plan there)
    cfg, plan = pipeline.compile(args.config, parse_sets(overrides), must_fit=True)
    run_dir = Path(args.run_dir).absolute() if args.run_dir else rundir.default_run_dir(cfg, args.config)
    try:
        job = build_job(args, run_dir, cfg, plan, overrides)
        text = render(job)
    except ValueError as exc:
        raise SystemExit(f"shardtrain sbatch: {exc}") from None
    # command.txt is the job itself: its nodes, GPUs and device are the plan's, not this machine's
    rundir.write_run_dir(run_dir, cfg, plan, command_text=text, resume=cfg.run.resume is not Resume.NEVER)
    if job.user_command:  # the Trainer-facing DeepSpeed JSON the user's command is pointed at
        from shardtrain.launcher.ownscript import script_files
        from shardtrain import rundir_format as rf
        for name, d in script_files(plan, cfg).items():
            (run_dir / name).write_text(rf.json_text(d))
    script: Optional[Path] = Path(args.script) if args.script else None
    if args.submit and script is None:
        script = run_dir / "job.sbatch"
    if script is not None:
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(text)
        script.chmod(0o755)
        print(f"wrote {script}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.submit:
        from shardtrain.slurm.submit import SubmitError, submit

        try:
            job_id = submit(script)
        except SubmitError as exc:
            print(f"shardtrain sbatch: {exc}", file=sys.stderr)
            return 1
        print(job_id)
    return 0


#: Multi-node renderings of example configs, besides each config's own hardware: stem -> nodes.
EXAMPLE_MULTI_NODE: dict[str, tuple[int, ...]] = {
    "llama3-8b-full-8x80gb": (4,),
    "llama3-70b-full-8x80gb": (4,),
}
EXAMPLES_DIR = "configs/examples"
SCRIPTS_DIR = "slurm"


def example_jobs(root: Path) -> dict[str, SbatchJob]:
    """``slurm/<name>.sbatch`` -> SbatchJob for every ``configs/examples/*.yaml`` (its own
    hardware, plus the node counts in EXAMPLE_MULTI_NODE). Paths are relative to the repository
    root, which is where the scripts are submitted from. Compiles each plan (pure)."""
    from shardtrain.compiler.specs import Device
    from shardtrain.config import pipeline
    from shardtrain.config.flags import parse_sets
    from shardtrain.launcher.rankstart import choose_launcher
    from shardtrain.slurm import resources

    root = Path(root)
    jobs: dict[str, SbatchJob] = {}
    for path in sorted((root / EXAMPLES_DIR).glob("*.yaml")):
        rel = path.relative_to(root).as_posix()
        for nodes in (None, *EXAMPLE_MULTI_NODE.get(path.stem, ())):
            overrides = () if nodes is None else (f"hardware.nodes={nodes}",)
            cfg, plan = pipeline.compile(str(path), parse_sets(overrides))
            name = (cfg.run.name or path.stem) + ("" if nodes is None else f"-{nodes}node")
            script = f"{SCRIPTS_DIR}/{name}.sbatch"
            request_gpus = cfg.run.device is not Device.CPU
            jobs[script] = SbatchJob(
                run_dir=f"{cfg.run.output_dir}/{name}",
                nodes=cfg.hardware.nodes,
                gpus_per_node=cfg.hardware.gpus_per_node,
                launcher=choose_launcher(None, cfg, plan),
                job_name=name,
                config=rel,
                overrides=overrides,
                python="python3",
                time="08:00:00",
                output="slurm-%x-%j.out",
                request_gpus=request_gpus,
                cpus_per_task=resources.cpus_per_task(plan),
                mem=resources.mem_per_node(plan, on_cpu=not request_gpus),
                max_requeues=cfg.run.max_requeues,
                comment=(
                    f"Example generated from {rel} by `python -m shardtrain.slurm.cli examples`",
                    "(tests/test_slurm_render.py fails when it drifts). Submit from the repository",
                    f"root with the project's venv active: sbatch {script}",
                    "Add --partition/--account/... on the sbatch command line or re-render with",
                    f"`shardtrain sbatch {rel} [--nodes N --gpus-per-node G ...]`.",
                ),
            )
    return jobs


def example_scripts(root: Path) -> dict[str, str]:
    """``{relative script path: text}`` for :func:`example_jobs`."""
    return {name: render(job) for name, job in example_jobs(root).items()}


def write_examples(root: Path) -> list[Path]:
    """(Re)write ``slurm/*.sbatch`` from the example configs; removes scripts with no config."""
    root = Path(root)
    scripts = example_scripts(root)
    out_dir = root / SCRIPTS_DIR
    out_dir.mkdir(exist_ok=True)
    for stale in out_dir.glob("*.sbatch"):
        if f"{SCRIPTS_DIR}/{stale.name}" not in scripts:
            stale.unlink()
    written = []
    for name, text in scripts.items():
        path = root / name
        path.write_text(text)
        path.chmod(0o755)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m shardtrain.slurm.cli prepare RUN.yaml --run-dir DIR [--set k=v]`` (used by
    rendered scripts) and ``python -m shardtrain.slurm.cli sbatch …`` (same as ``shardtrain sbatch``)."""
    parser = argparse.ArgumentParser(prog="python -m shardtrain.slurm.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="prepare a run directory (run.yaml, plan.json, …)")
    prep.add_argument("config", metavar="RUN.yaml")
    prep.add_argument("--run-dir", required=True)
    prep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    prep.add_argument("--command-file", metavar="PATH",
                      help="the job's batch script, recorded as command.txt (rendered scripts pass \"$0\")")
    ex = sub.add_parser("examples", help="regenerate slurm/*.sbatch from configs/examples/*.yaml")
    ex.add_argument("--root", default=".", help="repository root (default: .)")
    add_sbatch_parser(sub)
    args = parser.parse_args(argv)
    from shardtrain.compiler.planner import PlanningError
    from shardtrain.config.schema import ConfigError

    try:
        if args.command == "prepare":
            print(_prepare(args.config, args.overrides, Path(args.run_dir).absolute(), args.command_file))
            return 0
        if args.command == "examples":
            for path in write_examples(Path(args.root)):
                print(path)
            return 0
        return args.func(args)
    except (ConfigError, PlanningError) as exc:
        print(f"shardtrain: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
