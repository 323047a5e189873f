"""Issue 22 (1): `shardtrain launch ... -- python train.py ARGS` runs the user's own script on every rank.

Fast (no ranks): the user command -> launcher argv, parsed back by torchrun's and the deepspeed runner's own
parsers; accelerate's environment compared with what accelerate's OWN launcher exports for our emitted
accelerate YAML; the --trainer-args flags parsed by transformers' HfArgumentParser; a dry run; a missing
script refused by the preflight.

End to end (multiproc): an unmodified-style HF Trainer script (tests/fixtures/own_scripts/hf_trainer_train.py)
on 2 CPU ranks under DDP, FSDP2 and ZeRO-2 plans, and a plain accelerate loop under the FSDP2 plan: the
Trainer's own batch size, accumulation and world size equal the plan's; ZeRO-2 really is a DeepSpeed
stage-2 engine. On CPU accelerate 1.15 has no FSDP (its FSDP branch needs a GPU-like distributed type), so
the FSDP2 runs check that accelerate READS the plan's FSDP2 settings from the environment and runs the
documented MULTI_CPU (DDP) fallback — an accelerate that gains CPU FSDP makes that assertion fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from shardtrain.config import pipeline
from shardtrain.launcher import ownscript
from shardtrain.launcher.rankstart import EntryKind, Entrypoint, build_launch, deepspeed_argv, torchrun_argv

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "tests" / "fixtures" / "own_scripts"
TRAINER = SCRIPTS / "hf_trainer_train.py"
LOOP = SCRIPTS / "accelerate_loop.py"
#: the plan of every e2e run: 2 ranks, micro batch 2 × accumulation 2 × 2 ranks = global batch 8
PLAN_FLAGS = ["--model", "tiny-llama", "--gpus-per-node", "2", "--seq-len", "32", "--global-batch", "8",
              "--micro-batch", "2", "--precision", "fp32", "--set", "run.device=cpu"]


def _plan(strategy: str, precision: str = "fp32", nproc: int = 2, ckpt: str = "none"):
    return pipeline.compile({"model": {"name": "tiny-llama"}, "hardware": {"gpus_per_node": nproc, "gpu": "h100-80gb"},
                             "train": {"seq_len": 32, "global_batch": 4 * nproc, "micro_batch": 2, "strategy": strategy,
                                       "precision": precision, "grad_ckpt": ckpt}}, {})


# --------------------------------------------------------------------------- the command
@pytest.mark.parametrize("argv, kind, target, args, python", [
    (["python", "train.py", "--lr", "1e-4"], EntryKind.SCRIPT, "train.py", ("--lr", "1e-4"), "python"),
    (["/v/bin/python3.11", "-u", "t.py"], EntryKind.SCRIPT, "t.py", (), "/v/bin/python3.11"),
    (["python3", "-m", "trl.scripts.sft", "--x"], EntryKind.MODULE, "trl.scripts.sft", ("--x",), "python3"),
    (["./train.sh", "a b"], EntryKind.PROGRAM, "./train.sh", ("a b",), None),
])
def test_parse_command(argv, kind, target, args, python):
    entry, py = ownscript.parse_command(argv)
    assert (entry.kind, entry.target, entry.args, py) == (kind, target, args, python)


@pytest.mark.parametrize("argv, match", [([], "empty"), (["python"], "without a script"),
                                          (["python", "-m"], "module name"), (["python", "-c", "x"], "script file")])
def test_parse_command_refuses(argv, match):
    with pytest.raises(ownscript.OwnScriptError, match=match):
        ownscript.parse_command(argv)


def test_user_command_through_the_launchers_own_parsers():
    from deepspeed.launcher.runner import parse_args as ds_parse
    from torch.distributed.run import get_args_parser
    script = Entrypoint(EntryKind.SCRIPT, "train.py", ("--output_dir", "o d", "--lr", "1e-4"))
    a = get_args_parser().parse_args(torchrun_argv(nproc_per_node=2, entry=script)[1:])
    assert not a.module and not a.no_python and a.training_script == "train.py"
    assert a.training_script_args == ["--output_dir", "o d", "--lr", "1e-4"]
    a = get_args_parser().parse_args(torchrun_argv(nproc_per_node=2, entry=Entrypoint(EntryKind.MODULE, "m.t", ("-x",)))[1:])
    assert a.module and a.training_script == "m.t" and a.training_script_args == ["-x"]
    a = get_args_parser().parse_args(torchrun_argv(nproc_per_node=2, entry=Entrypoint(EntryKind.PROGRAM, "./t.sh"))[1:])
    assert a.no_python and a.training_script == "./t.sh"
    d = ds_parse(deepspeed_argv(num_gpus=2, master_port=1234, entry=script)[1:])
    assert d.user_script == "train.py" and d.user_args == ["--output_dir", "o d", "--lr", "1e-4"]
    assert not d.module and not d.no_python and d.no_local_rank
    d = ds_parse(deepspeed_argv(num_gpus=2, entry=Entrypoint(EntryKind.MODULE, "m.t"))[1:])
    assert d.module and d.user_script == "m.t"
    d = ds_parse(deepspeed_argv(num_gpus=2, entry=Entrypoint(EntryKind.PROGRAM, "./t.sh"))[1:])
    assert d.no_python and d.user_script == "./t.sh"


def test_build_launch_runs_the_users_command(tmp_path):
    cfg, plan = _plan("zero2")
    own = ownscript.own_script(["python", "train.py", "--output_dir", "out"], plan, cfg, run_dir=str(tmp_path),
                               device="cpu", trainer_args=True, environ={"ACCELERATE_MIXED_PRECISION": "fp16"})
    s = build_launch(run_dir=tmp_path, launcher="deepspeed", nproc_per_node=2, python="/py", environ={},
                     extra_env=own.env, entry=own.entry, files=own.files, master_port=20001)
    argv = list(s.argv)
    assert argv[:3] == ["/py", "-m", "deepspeed.launcher.runner"] and "shardtrain.runtime.worker" not in argv
    tail = argv[argv.index("train.py"):]
    assert tail[:3] == ["train.py", "--output_dir", "out"]  # the user's arguments first, then the plan's
    assert tail[3:] == list(own.trainer_args)
    ds_file = str(tmp_path / ownscript.SCRIPT_DS_CONFIG)
    assert own.trainer_args[own.trainer_args.index("--deepspeed") + 1] == ds_file and "--use_cpu" in own.trainer_args
    assert s.env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == ds_file and s.env["DS_ACCELERATOR"] == "cpu"
    assert "ACCELERATE_MIXED_PRECISION" not in s.env  # the user's own export wins
    assert "ACCELERATE_USE_CPU" not in s.env  # it would turn DeepSpeed off (accelerate state.py)
    ds = json.loads(s.files[ds_file])
    assert ds["zero_optimization"]["stage"] == 2 and ds["optimizer"]["params"]["lr"] == "auto"
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 2, 8)
    script = s.script()
    assert "train.py" in script and "--per_device_train_batch_size 2" in script  # command.txt: the real command


# --------------------------------------------------------------------------- accelerate's own contract
def _accelerates_env(plan, ds_path: str) -> dict[str, str]:
    """What `accelerate launch --config_file <our emitted YAML>` exports (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    from shardtrain.emit.accelerate import accelerate_config, render_yaml
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(render_yaml(accelerate_config(plan, ds_config_path=ds_path)))
    try:
        args, defaults, mp = _validate_launch_command(launch_command_parser().parse_args(["--config_file", f.name,
                                                                                           "train.py"]))
    finally:
        os.unlink(f.name)
    args.main_process_port = 0  # a free port: the check for 29500 in use is not ours to test
    if args.use_deepspeed:  # as accelerate's launch_command does before deepspeed_launcher
        args.deepspeed_fields_from_accelerate_config = ",".join(list(defaults.deepspeed_config) + (["mixed_precision"] if mp else []))
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("strategy, precision, ckpt", [("ddp", "bf16", "none"), ("fsdp_full_shard", "bf16", "full"),
                                                       ("fsdp_shard_grad_op", "fp16", "none"), ("zero2", "bf16", "none"),
                                                       ("zero3", "bf16", "full")])
def test_env_is_what_accelerates_own_launcher_exports(strategy, precision, ckpt):
    _, plan = _plan(strategy, precision, nproc=4, ckpt=ckpt)
    ours = ownscript.accelerate_env(plan, device="cuda", ds_config_path="/run/hf_ds_config.json")
    theirs = _accelerates_env(plan, "/run/hf_ds_config.json")
    assert {k: theirs.get(k) for k in ours} == ours
    key = {"ddp": None, "fsdp_full_shard": "ACCELERATE_USE_FSDP", "fsdp_shard_grad_op": "ACCELERATE_USE_FSDP",
           "zero2": "ACCELERATE_USE_DEEPSPEED", "zero3": "ACCELERATE_USE_DEEPSPEED"}[strategy]
    assert key is None or ours[key] == "true"
    if key == "ACCELERATE_USE_FSDP":
        assert ours["FSDP_VERSION"] == "2"
        assert ours["FSDP_RESHARD_AFTER_FORWARD"] == ("true" if strategy == "fsdp_full_shard" else "false")


def test_cpu_ranks_get_gloo_except_under_deepspeed():
    _, plan = _plan("fsdp_full_shard")
    assert ownscript.accelerate_env(plan, device="cpu")["ACCELERATE_USE_CPU"] == "true"
    assert "ACCELERATE_USE_CPU" not in ownscript.accelerate_env(plan, device="cuda")
    _, plan = _plan("zero2")
    assert "ACCELERATE_USE_CPU" not in ownscript.accelerate_env(plan, device="cpu")


def test_trainer_args_are_read_by_hf_argument_parser():
    from transformers import HfArgumentParser, TrainingArguments
    _, plan = _plan("ddp", "bf16", ckpt="full")
    argv = ["--output_dir", "/tmp/x", "--per_device_train_batch_size", "8", *ownscript.trainer_argv(plan, device="cpu")]
    (a,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv, look_for_args_file=False)
    c = plan.chosen
    assert (a.per_device_train_batch_size, a.gradient_accumulation_steps) == (c.micro_batch_size, c.grad_accum_steps)
    assert a.bf16 and not a.fp16 and (a.gradient_checkpointing or a.activation_checkpointing)
    assert a.use_cpu and "--deepspeed" not in argv
    _, plan = _plan("fsdp_full_shard", ckpt="full")  # FSDP checkpoints via FSDP_ACTIVATION_CHECKPOINTING
    assert "--gradient_checkpointing" not in ownscript.trainer_argv(plan, device="cuda")


def test_preflight_checks_the_script_not_the_data(tmp_path):
    from shardtrain.launcher import preflight
    cfg, plan = pipeline.compile({"model": {"name": "tiny-llama"}, "hardware": {"gpus_per_node": 2},
                                  "train": {"seq_len": 32, "global_batch": 8},
                                  "data": {"train": str(tmp_path / "no-such-data.jsonl")}, "run": {"device": "cpu"}}, {})
    box = preflight.Machine(gpus=0, host_memory_bytes=2**34, host_available_bytes=2**34, cpus=2)
    kw = dict(machine=box, device="cpu", nproc=2, run_dir=tmp_path / "run")
    assert any("no-such-data" in p for p in preflight.check(cfg, plan, **kw).problems)  # our worker reads data.train
    script = tmp_path / "train.py"
    missing = preflight.check(cfg, plan, **kw, entry=Entrypoint(EntryKind.SCRIPT, str(script))).problems
    assert len(missing) == 1 and "train.py does not exist" in missing[0] and "fix:" in missing[0]
    script.write_text("print('hi')\n")
    assert preflight.check(cfg, plan, **kw, entry=Entrypoint(EntryKind.SCRIPT, str(script))).problems == []
    nope = preflight.check(cfg, plan, **kw, entry=Entrypoint(EntryKind.PROGRAM, "no-such-program-xyz")).problems
    assert len(nope) == 1 and "neither an executable" in nope[0]


# --------------------------------------------------------------------------- the CLI
def _env(**extra) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _launch(args: list[str], timeout: int = 600, cwd=None) -> subprocess.CompletedProcess:
    cmd = ["timeout", "-k", "10", str(timeout), sys.executable, "-m", "shardtrain", "launch", *args]
    # the fixtures' watchdog (SHARDTRAIN_TEST_WATCHDOG_S) dumps every thread's stack into the rank log
    # and exits, well before this timeout: a hang shows where it hung (CI saw one 600 s hang, 2026-12-05)
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(SHARDTRAIN_TEST_WATCHDOG_S="240"),
                          cwd=cwd or ROOT)


def _rank_logs(run) -> str:
    """Every rank log of a run dir (torchrun --redirects 3), for a failing assertion's message."""
    out = []
    for f in sorted(run.glob("logs/*/**/*.log")) + sorted(run.glob("logs/*/**/std*")):
        if f.is_file():
            out.append(f"--- {f.relative_to(run)}\n{f.read_text(errors='replace')[-3000:]}")
    return "\n".join(out)


def test_dry_run_shows_the_users_command_and_the_plans_flags(tmp_path):
    run = tmp_path / "run"
    r = _launch([*PLAN_FLAGS, "--strategy", "zero2", "--run-dir", str(run), "--dry-run", "--trainer-args", "--",
                 sys.executable, str(TRAINER), "--output_dir", "out"], timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "via deepspeed" in out and "-m deepspeed.launcher.runner" in out and str(TRAINER) in out
    assert "shardtrain.runtime.worker" not in out
    assert "--trainer-args appends to your arguments: --per_device_train_batch_size 2 --gradient_accumulation_steps 2" in out
    assert f"--deepspeed {run}/hf_ds_config.json" in out and "--use_cpu" in out
    assert "export ACCELERATE_USE_DEEPSPEED=true" in out and "hf_ds_config.json" in out
    assert not run.exists()


def test_missing_script_is_one_line_and_starts_nothing(tmp_path):
    r = _launch([*PLAN_FLAGS, "--strategy", "ddp", "--run-dir", str(tmp_path / "run"), "--",
                 sys.executable, str(tmp_path / "nope.py")], timeout=120)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if "preflight:" in ln]
    assert len(errors) == 1 and "nope.py does not exist" in errors[0] and "fix:" in errors[0], r.stderr
    assert "nothing was started" in r.stderr and not (tmp_path / "run").exists()


def test_trainer_args_without_a_command_is_refused(tmp_path):
    r = _launch([*PLAN_FLAGS, "--run-dir", str(tmp_path / "run"), "--trainer-args", "--dry-run"], timeout=120)
    assert r.returncode == 1 and "--trainer-args" in r.stderr and "Traceback" not in r.stderr
    r = _launch([*PLAN_FLAGS, "--run-dir", str(tmp_path / "run"), "--dry-run", "--"], timeout=120)
    assert r.returncode == 1 and "the command after `--` is empty" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- end to end
@pytest.mark.multiproc
@pytest.mark.parametrize("strategy", ["ddp", "fsdp_full_shard", "zero2"])
def test_unmodified_trainer_script_runs_the_plan(tmp_path, strategy):
    run, report = tmp_path / "run", tmp_path / "report.json"
    r = _launch([*PLAN_FLAGS, "--strategy", strategy, "--run-dir", str(run), "--trainer-args", "--",
                 sys.executable, str(TRAINER), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                 "--report_to", "none", "--save_strategy", "no", "--log_level", "info",
                 "--report_file", str(report)], timeout=600, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    plan = json.loads((run / "plan.json").read_text())
    micro, accum, world = plan["micro_batch_size"], plan["grad_accum_steps"], plan["world_size"]
    assert (micro, accum, world) == (2, 2, 2)
    rep = json.loads(report.read_text())
    # the Trainer's own values, and its own log lines (rank 0's output is streamed to our console)
    assert (rep["per_device_train_batch_size"], rep["gradient_accumulation_steps"], rep["world_size"]) == (micro, accum, world)
    assert rep["total_train_batch_size"] == micro * accum * world == 8 and rep["global_step"] == 2
    assert f"Instantaneous batch size per device = {micro}" in out and f"Gradient Accumulation steps = {accum}" in out
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in out
    assert rep["backend"] == "gloo" and rep["device"].startswith("cpu")
    if strategy == "zero2":
        assert rep["distributed_type"] == "DistributedType.DEEPSPEED" and rep["zero_stage"] == 2
        assert rep["deepspeed_gradient_accumulation_steps"] == accum and "via deepspeed" in out
    else:
        assert rep["distributed_type"] == "DistributedType.MULTI_CPU" and "via torchrun" in out
    if strategy == "fsdp_full_shard":  # read by accelerate; CPU falls back to DDP (module docstring)
        assert rep["env"]["ACCELERATE_USE_FSDP"] == "true" and rep["env"]["FSDP_VERSION"] == "2"
    command = (run / "command.txt").read_text()
    assert str(TRAINER) in command and "--per_device_train_batch_size 2" in command
    assert {"run.yaml", "plan.json", "command.txt"} <= {p.name for p in run.iterdir()} and any((run / "logs").iterdir())
    assert r.stdout.strip().splitlines()[-1].startswith("shardtrain: OK")


@pytest.mark.multiproc
def test_plain_accelerate_loop_reads_the_fsdp2_plan(tmp_path):
    run, report = tmp_path / "run", tmp_path / "loop.json"
    r = _launch([*PLAN_FLAGS, "--strategy", "fsdp_full_shard", "--run-dir", str(run), "--",
                 sys.executable, str(LOOP), str(report), "3"], timeout=360, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:] + _rank_logs(run)
    rep = json.loads(report.read_text())
    assert rep["num_processes"] == 2 and rep["backend"] == "gloo" and len(rep["losses"]) == 3
    assert rep["distributed_type"] == "DistributedType.MULTI_CPU"  # accelerate has no CPU FSDP (docstring)
    assert rep["fsdp_from_env"] == {"version": 2, "reshard_after_forward": True,
                                    "transformer_cls_names_to_wrap": ["LlamaDecoderLayer"],
                                    "state_dict_type": "StateDictType.SHARDED_STATE_DICT"}


# --------------------------------------------------------------------------- sbatch
def test_sbatch_runs_the_users_command_on_every_node(tmp_path, capsys):
    """The rendered batch script, run by bash with srun/scontrol as shell functions and a stand-in
    interpreter that records its argv: each node's launcher gets the user's words intact (quotes, spaces,
    `$`), after torchrun's flags, and the job exports accelerate's variables."""
    from torch.distributed.run import get_args_parser

    from shardtrain.cli import main
    run, job = tmp_path / "run", tmp_path / "job.sbatch"
    fake = tmp_path / "fakepy"
    fake.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$FAKEPY_OUT.$SLURM_NODEID"\n')
    fake.chmod(0o755)
    words = ["train.py", "--output_dir", "o d", "--note", "it's $HOME"]
    assert main(["sbatch", *PLAN_FLAGS, "--strategy", "fsdp_full_shard", "--nodes", "2", "--run-dir", str(run),
                 "--python", str(fake), "--script", str(job), "--trainer-args", "--", "python", *words]) == 0
    text = job.read_text()
    assert "SHARDTRAIN_COMMAND=(" in text and "export ACCELERATE_USE_FSDP=true" in text and "FSDP_VERSION=2" in text
    assert "shardtrain.runtime.worker" not in text
    stubs = ('srun() { while [ "$1" != bash ]; do shift; done; for n in 0 1; do SLURM_NODEID=$n "$@"; done; }; '
             'scontrol() { printf "n1\\nn2\\n"; }; export -f srun scontrol; ')
    env = {**os.environ, "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "77", "FAKEPY_OUT": str(tmp_path / "argv")}
    r = subprocess.run(["bash", "-c", stubs + f"source {job}"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    for node in (0, 1):
        argv = (tmp_path / f"argv.{node}").read_text().splitlines()
        assert argv[:2] == ["-m", "torch.distributed.run"]
        a = get_args_parser().parse_args(argv[2:])
        assert a.nnodes == "2" and a.training_script == "train.py" and not a.module
        assert a.training_script_args[:4] == words[1:]
        assert a.training_script_args[4:6] == ["--per_device_train_batch_size", "2"] and "--use_cpu" in argv


@pytest.mark.multiproc
def test_a_failing_own_script_is_reported_once(tmp_path):
    """Supervision as for our worker: the first failing rank's traceback once, a FAILED summary, exit 1."""
    script = tmp_path / "fails.py"
    script.write_text("import os, time\nif os.environ['RANK'] == '1':\n    raise ValueError('boom on rank 1')\n"
                      "time.sleep(1)\n")
    r = _launch([*PLAN_FLAGS, "--strategy", "ddp", "--run-dir", str(tmp_path / "run"), "--", sys.executable,
                 str(script)], timeout=300, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.count("Traceback (most recent call last)") == 1 and "rank 1 failed first" in r.stderr
    assert "shardtrain: FAILED — rank 1: ValueError: boom on rank 1" in r.stderr
    assert str(script) in (tmp_path / "run" / "command.txt").read_text()
