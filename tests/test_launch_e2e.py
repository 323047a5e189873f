"""`shardtrain launch`: pure launch specs, failure analysis, and real end-to-end runs on CPU/gloo.

End-to-end (marked multiproc, ~60-90 s together on 2 cores with DeepSpeed ops prebuilt):
- the real worker through torchrun (DDP) and through the deepspeed launcher (ZeRO-2), a few steps each;
- a failing rank (a stand-in worker written into tmp_path): one clean traceback, non-zero exit;
- two "nodes" on one machine (torchrun c10d rendezvous) with the stand-in.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shardtrain.launcher import failure, hosts, logtail, rankstart

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "examples" / "tiny-cpu.yaml"

STANDIN = textwrap.dedent('''
    """Stand-in worker: a few all-reduces; STANDIN_FAIL_RANK raises on that rank at step 3."""
    import argparse, json, os, sys, time
    import torch, torch.distributed as dist
    ap = argparse.ArgumentParser(); ap.add_argument("--run-dir"); a = ap.parse_args()
    dist.init_process_group("gloo")
    r, w = dist.get_rank(), dist.get_world_size()
    fail = int(os.environ.get("STANDIN_FAIL_RANK", "-1"))
    for step in range(1, 6):
        t = torch.ones(1)
        dist.all_reduce(t)
        assert int(t.item()) == w
        if r == fail and step == 3:
            raise ValueError(f"boom on rank {r} at step {step}")
        if r == 0:
            sys.stderr.write(f"\\rstep {step}/5"); sys.stderr.flush()
            with open(os.path.join(a.run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"kind": "train", "step": step, "loss": 10.0 / step}) + "\\n")
        time.sleep(0.1)
    if r == 0:
        print(f"\\nstand-in done: world {w}")
    dist.destroy_process_group()
''')


# --------------------------------------------------------------------------- fast: no processes
def test_torchrun_spec_on_cpu(tmp_path):
    s = rankstart.build_launch(run_dir=tmp_path, launcher="torchrun", nproc_per_node=2, gpus=0, cpu_count=2,
                               python="/py", environ={})
    a = list(s.argv)
    assert a[:3] == ["/py", "-m", "torch.distributed.run"] and "--standalone" in a
    assert a[a.index("--redirects") + 1] == "3" and a.index("--redirects") < a.index("shardtrain.runtime.worker")
    assert a[a.index("--log_dir") + 1] == str(s.log_dir) and s.log_dir.parent == tmp_path / "logs"
    assert a[-2:] == ["--run-dir", str(tmp_path)]
    assert s.env["DS_ACCELERATOR"] == "cpu" and s.env["LOCAL_SIZE"] == "2" and s.env["OMP_NUM_THREADS"] == "1"
    assert s.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert "gloo" in s.describe() and "2 CPU processes" in s.describe()
    assert s.script().startswith("#!/usr/bin/env bash") and "export LOCAL_SIZE=2" in s.script()


def test_gpu_spec_and_user_omp_threads(tmp_path):
    s = rankstart.build_launch(run_dir=tmp_path, launcher="torchrun", nproc_per_node=8, gpus=8, cpu_count=64,
                               environ={"OMP_NUM_THREADS": "4"})
    assert s.device == "cuda" and "DS_ACCELERATOR" not in s.env and "LOCAL_SIZE" not in s.env
    assert "OMP_NUM_THREADS" not in s.env  # the user's choice is inherited
    s = rankstart.build_launch(run_dir=tmp_path, launcher="torchrun", nproc_per_node=8, gpus=8, cpu_count=64)
    assert s.env["OMP_NUM_THREADS"] == "8"


def test_multi_node_specs(tmp_path):
    t = rankstart.build_launch(run_dir=tmp_path / "job", launcher="torchrun", nproc_per_node=4, nnodes=2, node_rank=1,
                               rdzv_endpoint="node0:29400", gpus=4)
    a = list(t.argv)
    assert a[a.index("--rdzv_endpoint") + 1] == "node0:29400" and a[a.index("--rdzv_id") + 1] == "shardtrain-job"
    assert "--standalone" not in a and t.log_dir.name.endswith("-node1")
    d = rankstart.build_launch(run_dir=tmp_path / "job", launcher="deepspeed", nproc_per_node=4, nnodes=2, node_rank=1,
                               rdzv_endpoint="node0:29400", gpus=4)
    a = list(d.argv)
    assert "--no_ssh" in a and a[a.index("--node_rank") + 1] == "1" and a[a.index("--master_addr") + 1] == "node0"
    assert a[a.index("--master_port") + 1] == "29400"
    hostfile = a[a.index("--hostfile") + 1]
    assert d.files[hostfile] == "node0 slots=4\nnode1 slots=4\n"
    assert any(x.startswith("--enable_each_rank_log=") for x in a)
    with pytest.raises(ValueError, match="restart"):
        rankstart.build_launch(run_dir=tmp_path, launcher="deepspeed", nproc_per_node=2, max_restarts=1)
    with pytest.raises(ValueError, match="rdzv"):
        rankstart.build_launch(run_dir=tmp_path, launcher="deepspeed", nproc_per_node=2, nnodes=2, node_rank=0)


def test_workers_find_the_ops_built_for_this_environment(tmp_path):
    assert hosts.ops_env({}, str(tmp_path)) == {}
    (tmp_path / "torch_extensions").mkdir()
    assert hosts.ops_env({}, str(tmp_path)) == {"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions")}
    assert hosts.ops_env({"TORCH_EXTENSIONS_DIR": "/x"}, str(tmp_path)) == {}  # the user's choice wins
    s = rankstart.build_launch(run_dir=tmp_path, launcher="deepspeed", nproc_per_node=2,
                               extra_env=hosts.ops_env({}, str(tmp_path)))
    assert "export TORCH_EXTENSIONS_DIR=" in s.script()


def test_no_gpu_visible():
    assert hosts.count_local_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert hosts.local_devices("cpu") == (0, "cpu")


def _torchrun_logs(tmp_path: Path, files: dict[int, str]) -> rankstart.LaunchSpec:
    s = rankstart.build_launch(run_dir=tmp_path, launcher="torchrun", nproc_per_node=len(files), log_dir=tmp_path / "L")
    for rank, text in files.items():
        d = tmp_path / "L" / "abc_x" / "attempt_0" / str(rank)
        d.mkdir(parents=True)
        (d / "stdout.log").write_text("")
        (d / "stderr.log").write_text(text)
        time.sleep(0.02)
    return s


def test_first_failure_is_the_cause_not_the_collateral(tmp_path):
    collateral = ("[rank0]: Traceback (most recent call last):\n[rank0]:   File \"w.py\", line 3, in <module>\n"
                  "[rank0]: RuntimeError: [gloo/pair.cc:553] Connection closed by peer [127.0.0.1]:123\n")
    cause = ("some log line\n[rank1]: Traceback (most recent call last):\n[rank1]:   File \"w.py\", line 9, in f\n"
             "[rank1]:     raise ValueError('boom')\n[rank1]: ValueError: boom\n"
             "[W1122 03:04:32 ProcessGroupGloo.cpp] Warning: destroy_process_group() was not called\n")
    # the collateral traceback is written FIRST (earlier mtime) and must still lose
    s = _torchrun_logs(tmp_path, {0: collateral, 1: cause})
    f = failure.find_first_failure(s, "  rank      : 1 (local_rank: 1)\n  exitcode  : 1 (pid: 9)\n")
    assert f.rank == 1 and f.exception == "ValueError: boom" and f.exitcode == 1 and not f.collateral
    assert f.traceback.startswith("Traceback (most recent call last):") and f.traceback.endswith("ValueError: boom")
    assert "[rank1]" not in f.traceback and "destroy_process_group" not in f.traceback


def test_killed_rank_without_traceback(tmp_path):
    s = _torchrun_logs(tmp_path, {0: "", 1: ""})
    log = ("Root Cause (first observed failure):\n[0]:\n  time : x\n  host : h\n"
           "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 5)\n")
    f = failure.find_first_failure(s, log)
    assert f.rank == 1 and "SIGKILL" in f.exception and "out of memory" in f.exception


def test_console_tail_holds_back_tracebacks(tmp_path):
    import io

    class Out(io.StringIO):
        pass
    out, err = Out(), Out()
    s = rankstart.build_launch(run_dir=tmp_path, launcher="torchrun", nproc_per_node=2)
    t = logtail.Tail(s, out, err)
    p = tmp_path / "x.log"
    # a progress bar (carriage returns, no newline), then a traceback arriving in pieces mid-line
    for chunk in [b"\rtrain 1/5", b"\rtrain 2/5 loss 3.2", b"[ran", b"k0]: Trace", b"back (most recent call last):\n",
                  b"  File x\nValueError: no\n"]:
        t._feed(p, err, chunk)
    t._feed(p, err, b"", final=True)
    assert err.getvalue() == "\rtrain 1/5\rtrain 2/5 loss 3.2\n"


# --------------------------------------------------------------------------- end to end (processes)
def _env(**extra) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **extra}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _launch(args: list[str], *, timeout: int = 600, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    cmd = ["timeout", "-k", "10", str(timeout), sys.executable, "-m", "shardtrain", "launch", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), cwd=cwd or ROOT)


# Issue 13: secret-looking environment values must never be printed or land in a run directory.
SECRETS = {"HF_TOKEN": "hf_Zq8secretTOKENvalue1", "WANDB_API_KEY": "wb0secretAPIkeyValue2",
           "DB_PASSWORD": "pw-secretPASSWORD-3", "AWS_SECRET_ACCESS_KEY": "aws/secretACCESSkey4"}


def _assert_no_secrets(run_dir: Path, console: str) -> None:
    """Scan the console and EVERY file of the run dir (binary too: checkpoints, logs) for the values."""
    files = [p for p in Path(run_dir).rglob("*") if p.is_file()]
    assert files
    for v in SECRETS.values():
        assert v not in console
        for p in files:
            assert v.encode() not in p.read_bytes(), f"{v!r} written to {p}"


def _metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    return [r for r in (json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines())
            if r.get("kind", "train") == kind]


def _standin(tmp_path: Path) -> Path:
    d = tmp_path / "mods"
    d.mkdir(exist_ok=True)
    (d / "standin_worker.py").write_text(STANDIN)
    return d


def test_dry_run_writes_nothing(tmp_path):
    r = _launch([str(TINY), "--run-dir", str(tmp_path / "run"), "--dry-run"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.index("plan       ddp") < r.stdout.index("would run")  # the plan comes first
    assert "2 CPU processes on gloo via torchrun" in r.stdout
    assert "-m torch.distributed.run" in r.stdout and "--nproc_per_node 2" in r.stdout
    assert not (tmp_path / "run").exists()
    r = _launch([str(TINY), "--run-dir", str(tmp_path / "run"), "--dry-run", "--launcher", "deepspeed",
                 "--nproc-per-node", "1"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "-m deepspeed.launcher.runner" in r.stdout and "--num_gpus 1" in r.stdout and "world" not in r.stderr
    assert "micro batch 16 × accumulation 1 × 1 ranks" in r.stdout  # recompiled for 1 process


@pytest.mark.multiproc
def test_torchrun_end_to_end(tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    r = _launch([str(TINY), "--run-dir", str(run), "--steps", "6", "--set", "run.eval_every=3",
                 "--set", "run.checkpoint_every=3"], env=_env(**SECRETS))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "2 CPU processes on gloo via torchrun" in out
    last = [ln for ln in r.stdout.splitlines() if ln.strip()][-1]
    assert last.startswith("shardtrain: OK") and "via torchrun" in last, last
    train = _metrics(run)
    assert [m["step"] for m in train] == list(range(1, 7))
    assert train[-1]["loss"] < train[0]["loss"]
    assert _metrics(run, "eval")
    for name in ("run.yaml", "plan.json", "command.txt", "memory_rank0.json", "memory_rank1.json"):
        assert (run / name).is_file(), name
    assert "torch.distributed.run" in (run / "command.txt").read_text()
    assert any((run / "checkpoints").iterdir())
    assert "Traceback" not in out
    _assert_no_secrets(run, out)
    print(f"torchrun e2e: {time.time() - t0:.1f} s")


@pytest.mark.multiproc
def test_deepspeed_launcher_end_to_end(tmp_path):
    run = tmp_path / "run"
    t0 = time.time()
    r = _launch([str(TINY), "--run-dir", str(run), "--steps", "4", "--strategy", "zero2",
                 "--set", "run.eval_every=0", "--set", "run.checkpoint_every=0"], env=_env(**SECRETS))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "via deepspeed" in out  # auto: ZeRO plans go through the deepspeed launcher
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    assert "deepspeed.launcher.runner" in (run / "command.txt").read_text()
    logs = next(d for d in (run / "logs").iterdir() if d.is_dir())
    assert "deepspeed.launcher.launch" in (logs / "launcher.log").read_text()
    assert sorted(p.name.split("_")[-1] for p in logs.glob("*_rank*.log")) == ["rank0.log", "rank1.log"]
    train = _metrics(run)
    assert [m["step"] for m in train] == [1, 2, 3, 4] and train[-1]["loss"] < train[0]["loss"]
    _assert_no_secrets(run, out)
    print(f"deepspeed e2e: {time.time() - t0:.1f} s")


@pytest.mark.multiproc
def test_a_failing_rank_is_reported_once(tmp_path):
    mods = _standin(tmp_path)
    r = _launch([str(TINY), "--run-dir", str(tmp_path / "run"), "--worker-module", "standin_worker"], timeout=300,
                env=_env(PYTHONPATH=str(mods), STANDIN_FAIL_RANK="1"))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert out.count("Traceback (most recent call last)") == 1, out
    assert "rank 1 failed first" in r.stderr and "ValueError: boom on rank 1 at step 3" in r.stderr
    assert "Connection closed by peer" not in out and "ChildFailedError" not in out  # the collateral stays in logs
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert re.match(r"shardtrain: FAILED — rank 1: ValueError: boom on rank 1 at step 3 after \d+ s; logs in ", last)


@pytest.mark.multiproc
def test_two_nodes_on_one_machine(tmp_path):
    mods = _standin(tmp_path)
    port = rankstart.free_port()
    common = [str(TINY), "--run-dir", str(tmp_path / "run"), "--worker-module", "standin_worker", "--nnodes", "2",
              "--rdzv-endpoint", f"127.0.0.1:{port}"]
    env = _env(PYTHONPATH=str(mods))
    cmd = ["timeout", "-k", "10", "300", sys.executable, "-m", "shardtrain", "launch"]
    procs = [subprocess.Popen(cmd + common + ["--node-rank", str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for i in range(2)]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "stand-in done: world 4" in outs[0][0] + outs[1][0]
    assert "(node 1 of 2)" in outs[1][0]


@pytest.mark.multiproc
def test_signal_saves_and_exits_75(tmp_path):
    """Issue 13 (c): SIGTERM to a worker -> every rank saves at the next step, the launch exits with
    EXIT_PREEMPTED (75, distinct from success and failure) with a PREEMPTED summary line."""
    from shardtrain.exitcodes import EXIT_PREEMPTED
    run = tmp_path / "run"
    args = [str(TINY), "--run-dir", str(run), "--steps", "4", "--set", "run.eval_every=0",
            "--set", "run.checkpoint_every=0"]
    r = _launch(args, env=_env(SHARDTRAIN_TEST_SIGNAL_AT_STEP="2:TERM"))
    out = r.stdout + r.stderr
    assert r.returncode == EXIT_PREEMPTED, out[-4000:]
    assert "PREEMPTED" in out and "at step 2" in out and "Traceback" not in out
    assert (run / "checkpoints" / "step_2" / "COMPLETE").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_2"
    # Resuming from it (exactly, for every engine and each of the four signals) is tested with the
    # in-process driver: tests/runtime/test_checkpoint_resume.py::test_resume_is_exact.
