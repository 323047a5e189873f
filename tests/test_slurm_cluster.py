"""Rendered batch scripts on a real Slurm cluster (two slurmd on this machine, loopback only).

Needs root and Slurm (``.ci/install-slurm.sh``); skipped otherwise, but in CI (``CI=true``) a missing
Slurm fails instead (see ``tests/slurm_cluster.py``). Every wait has a timeout; a job still running
at a timeout is cancelled.

Scenarios (the real worker, ``configs/examples/tiny-cpu.yaml`` with few steps):
- a 1-node job with 2 processes (hostile job name and run-dir path; the batch shell prepares the
  run dir itself; fake GPUs requested through gres);
- a 2-node torchrun job (c10d), submitted with ``shardtrain sbatch --submit``;
- a 2-node deepspeed-launcher job (hostfile built at run time, ``--no_ssh --node_rank``);
- pre-emption, torchrun and deepspeed launcher: ``scancel --signal=USR2`` mid-run -> every rank
  stops at the same step, checkpoints, rank 0 runs ``scontrol requeue``, the requeued job resumes
  and completes with every optimizer step exactly once in ``metrics.jsonl``;
- a crashing rank (a stand-in worker that exits at step 3) ends the job promptly as FAILED.

All jobs are submitted at once by a module fixture (the cluster runs them concurrently: each takes
one CPU per node) so the module takes about as long as its longest job, not the sum.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

from shardtrain.slurm import SbatchJob, render
from shardtrain.slurm import cli as slurm_cli
from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture)

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY = REPO / "configs" / "examples" / "tiny-cpu.yaml"
JOB_TIMEOUT = 420.0
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}

#: Stand-in worker for the crash test: gloo all-reduces per "step"; the last rank exits at
#: ``crash_step`` as a crashing rank would (no traceback, no cleanup).
STANDIN = textwrap.dedent('''\
    import argparse, json, os, time
    from pathlib import Path
    import torch, torch.distributed as dist
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", required=True)
    args, _ = p.parse_known_args()
    run = Path(args.run_dir)
    cfg = json.loads((run / "standin.json").read_text())
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in range(1, cfg["steps"] + 1):
        time.sleep(cfg["sleep"])
        t = torch.tensor([float(step)])
        dist.all_reduce(t)
        if step == cfg["crash_step"] and rank == world - 1:
            print(f"[standin] rank {rank} crashes at step {step}", flush=True)
            os._exit(3)
        if rank == 0:
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"kind": "train", "step": step, "loss": 1.0}) + "\\n")
    dist.destroy_process_group()
''')


@dataclass
class Case:
    name: str
    job: SbatchJob
    script: Path
    steps: int
    job_id: str = ""
    submitted: float = 0.0
    signal_after: Optional[int] = None
    """Pre-emption: send the job's signal once metrics.jsonl has this many train steps."""
    signalled_after: Optional[int] = None
    state: str = ""
    wall: float = 0.0

    @property
    def run_dir(self) -> Path:
        return Path(self.job.run_dir)

    def log(self) -> str:
        path = Path(self.job.log_path(self.job_id))
        return path.read_text(errors="replace") if path.exists() else "(no log)"


def train_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for ln in path.read_text().splitlines():
        try:
            rec = json.loads(ln)
        except ValueError:
            continue  # a line being written
        if rec.get("kind", "train") == "train":
            out.append(rec)
    return out


def _env(workdir: Path) -> tuple[tuple[str, str], ...]:
    path = [str(REPO), str(workdir / "mods")]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    return (("PYTHONPATH", ":".join(path)), ("DS_ACCELERATOR", "cpu"), ("OMP_NUM_THREADS", "1"))


def _tiny_config(workdir: Path, name: str, steps: int, **train) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["train"].update(steps=steps, warmup_steps=2, **train)
    cfg["run"].update(eval_every=0, checkpoint_every=0, name=name, output_dir=str(workdir / "runs"))
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _job(workdir: Path, name: str, run_dir: Path, nodes: int, nproc: int, steps: int,
         launcher: str = "torchrun", **kw) -> Case:
    """A job whose batch shell prepares the run dir (config + overrides, no plan.json yet)."""
    overrides = (f"hardware.nodes={nodes}", f"hardware.gpus_per_node={nproc}",
                 *kw.pop("overrides", ()))
    # the batch shell prepares the run dir: the log cannot go into it (not there at submission)
    kw.setdefault("output", str(workdir / f"{name}-%j.out"))
    job = SbatchJob(
        run_dir=str(run_dir), nodes=nodes, gpus_per_node=nproc, launcher=launcher,
        job_name=kw.pop("job_name", name), config=str(_tiny_config(workdir, name, steps)),
        overrides=overrides, python=PYTHON, request_gpus=kw.pop("request_gpus", False),
        env=_env(workdir), **kw,
    )
    script = workdir / f"{name}.sbatch"
    script.write_text(render(job))
    return Case(name, job, script, steps)


PREEMPT_STEPS = 48
"""Steps of the pre-empted jobs: the watcher signals once metrics.jsonl shows step 2, and the worker
batches metric writes (runtime/telemetry.py MetricsWriter: up to 1 s), so the job must still be running
well after step 2 becomes visible (12 tiny steps took ~1 s and sometimes finished first)."""

def _cli_case(workdir: Path, name: str, nodes: int, nproc: int, steps: int, *extra: str,
              submit: bool = False) -> Case:
    """Through `shardtrain sbatch` (prepares the run dir now, renders, optionally submits)."""
    run_dir = workdir / "runs" / name
    script = workdir / f"{name}.sbatch"
    argv = ["sbatch", str(_tiny_config(workdir, name, steps)), "--nodes", str(nodes),
            "--gpus-per-node", str(nproc), "--run-dir", str(run_dir), "--script", str(script),
            "--no-gpu-request", "--python", PYTHON,
            # the plan asks for 8 CPUs per rank and its host RAM (slurm/resources.py): more than this
            # test cluster's nodes have; the flags override both (and so are tested too)
            "--cpus-per-task", "1", "--mem", "256M", *extra]
    for name_value in _env(workdir):
        argv += ["--env", "=".join(name_value)]
    if submit:
        argv.append("--submit")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = slurm_cli.main(argv)
    assert rc == 0, err.getvalue()
    # rebuild the job the CLI rendered, for the assertions (same inputs, same pure function)
    text = script.read_text()
    launcher = "deepspeed" if "deepspeed.launcher.runner" in text else "torchrun"
    job = SbatchJob(run_dir=str(run_dir), nodes=nodes, gpus_per_node=nproc, launcher=launcher)
    case = Case(name, job, script, steps)
    if submit:
        case.job_id = out.getvalue().strip()
        assert case.job_id.isdigit(), out.getvalue()
        case.submitted = time.monotonic()
    return case


def _crash_case(workdir: Path) -> Case:
    run = workdir / "runs" / "crash"
    run.mkdir(parents=True)
    (run / "plan.json").write_text("{}")
    (run / "standin.json").write_text(json.dumps({"steps": 1000, "sleep": 0.2, "crash_step": 3}))
    job = SbatchJob(run_dir=str(run), nodes=2, gpus_per_node=1, job_name="crash", python=PYTHON,
                    worker_module="shardtrain_standin_worker", request_gpus=False,
                    env=_env(workdir))
    script = workdir / "crash.sbatch"
    script.write_text(render(job))
    return Case("crash", job, script, 1000)


def _watch(cluster, cases: list[Case], stop: threading.Event) -> None:
    """Send the pre-emption signal to each case once it reached signal_after steps."""
    pending = [c for c in cases if c.signal_after]
    while pending and not stop.is_set():
        for c in list(pending):
            n = len(train_metrics(c.run_dir))
            if n >= c.signal_after:
                # Like the time-limit warning (#SBATCH --signal=USR2@N): Slurm signals every
                # process of the job steps, on every node (launchers included).
                subprocess.run(["scancel", f"--signal={c.job.signal_name}", c.job_id],
                               timeout=15, check=False)
                c.signalled_after = n
                pending.remove(c)
        time.sleep(0.05)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm-jobs")
    d.chmod(0o755)
    (d / "mods").mkdir()
    (d / "mods" / "shardtrain_standin_worker.py").write_text(STANDIN)
    return d


@pytest.fixture(scope="module")
def cases(slurm_cluster, workdir):
    hostile = workdir / "runs" / "one $(touch PWNED) it's; x"
    built = [
        # pre-empted mid-run (USR2 once 2 steps are logged), requeued, resumed, completed
        # (the DDP plan under the deepspeed launcher: the launcher wiring is what is tested here;
        # a ZeRO engine adds ~1 min of imports per launch on 2 cores)
        _job(workdir, "ds2", workdir / "runs" / "ds2", 2, 2, PREEMPT_STEPS, launcher="deepspeed"),
        _job(workdir, "one", hostile, 1, 2, 6, request_gpus=slurm_cluster.gpus_per_node >= 2,
             job_name="one 'tiny' $(touch PWNED); `x`"),
        _crash_case(workdir),
    ]
    for c in built:
        c.job_id = slurm_cluster.sbatch(c.script)
        c.submitted = time.monotonic()
    # through `shardtrain sbatch --submit`; pre-empted too
    built.insert(0, _cli_case(workdir, "tr2", 2, 2, PREEMPT_STEPS, submit=True))
    for c in built:
        if c.name in ("tr2", "ds2"):
            c.signal_after = 2
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(slurm_cluster, built, stop), daemon=True)
    watcher.start()
    try:
        yield {c.name: c for c in built}
    finally:
        stop.set()
        watcher.join(timeout=5)
        for c in built:
            if c.job_id and slurm_cluster.state(c.job_id) not in FINAL:
                slurm_cluster.cancel(c.job_id)


def finish(cluster, case: Case, timeout: float = JOB_TIMEOUT) -> Case:
    try:
        case.state = cluster.wait_done(case.job_id, timeout=max(1.0, case.submitted + timeout
                                                                - time.monotonic()))
    except TimeoutError as exc:
        raise AssertionError(f"{case.name}: {exc}\n--- job log\n{case.log()[-5000:]}\n"
                             f"--- daemons\n{cluster.logs(10)}") from None
    case.wall = time.monotonic() - case.submitted
    print(f"{case.name}: job {case.job_id} {case.state} {case.wall:.0f} s after submission")
    return case


def assert_trained(case: Case, world: int) -> list[dict]:
    log = case.log()
    assert case.state == "COMPLETED", f"{case.name}: {case.state}\n{log[-5000:]}"
    ms = train_metrics(case.run_dir)
    steps = [m["step"] for m in ms]
    assert steps == list(range(1, case.steps + 1)), f"optimizer steps in metrics.jsonl: {steps}"
    assert all(isinstance(m["loss"], float) for m in ms)
    assert (case.run_dir / "final").exists(), log[-3000:]
    assert (case.run_dir / "checkpoints" / f"step_{case.steps}").is_dir()
    plan = json.loads((case.run_dir / "plan.json").read_text())
    assert plan["world_size"] == world
    return ms


# ---------------------------------------------------------------------------------------------


def test_sbatch_reads_quoted_values_literally(slurm_cluster, workdir):
    """sbatch's own #SBATCH parser gets the literal (hostile) values; nothing executes."""
    mark = workdir / "PWNED-quote"
    name = f"a b'c\"d;$(touch {mark})`touch {mark}`"
    run = workdir / "runs" / "quote $(x) it's"
    run.mkdir(parents=True)
    job = SbatchJob(run_dir=str(run), nodes=1, gpus_per_node=1, job_name=name, python=PYTHON,
                    partition="debug", request_gpus=False)
    script = workdir / "quote.sbatch"
    script.write_text(render(job))
    job_id = slurm_cluster.sbatch(script, "--hold")  # held: parsed, never started
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%j|%P"], capture_output=True,
                             text=True, timeout=15).stdout
        assert out.rstrip("\n") == f"{name}|debug"
        show = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                              timeout=15).stdout
        stdout = [ln.strip()[len("StdOut="):] for ln in show.splitlines()
                  if ln.strip().startswith("StdOut=")]
        assert stdout == [f"{run}/slurm-{job_id}.out"], show
    finally:
        slurm_cluster.cancel(job_id)
    assert not mark.exists()


def test_flags_only_job_requests_the_plans_cpus_and_memory(slurm_cluster, workdir):
    """A flags-only `shardtrain sbatch` (no YAML): Slurm's own sbatch accepts the --cpus-per-task and
    --mem the plan asks for (issue 22); held, never started."""
    from shardtrain.slurm import resources
    run, script = workdir / "runs" / "flags", workdir / "flags.sbatch"
    argv = ["sbatch", "--model", "tiny-llama", "--seq-len", "64", "--global-batch", "4", "--gpus-per-node", "1",
            "--run-dir", str(run), "--script", str(script), "--no-gpu-request", "--python", PYTHON]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert slurm_cli.main(argv) == 0
    text = script.read_text()
    assert (run / "command.txt").read_text() == text
    cpus = resources.CPUS_PER_RANK
    mem = next(ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith("#SBATCH --mem="))
    assert f"#SBATCH --cpus-per-task={cpus}" in text and mem.endswith("G")
    job_id = slurm_cluster.sbatch(script, "--hold")
    try:
        info = slurm_cluster.job_info(job_id)
        assert info.get("MinCPUsNode") == str(cpus), info
        assert info.get("MinMemoryNode") == mem, info
    finally:
        slurm_cluster.cancel(job_id)


def test_one_node_two_processes(slurm_cluster, cases, workdir):
    case = finish(slurm_cluster, cases["one"])
    assert_trained(case, world=2)
    log = case.log()
    assert "[shardtrain] preparing" in log  # the batch shell prepared the run dir
    # ... and recorded the batch script Slurm ran ("$0", its spooled copy) as command.txt
    assert (case.run_dir / "command.txt").read_text() == case.script.read_text(), log[-3000:]
    assert not (workdir / "PWNED").exists() and not Path("PWNED").exists()
    info = subprocess.run(["squeue", "-h", "-t", "all", "-j", case.job_id, "-o", "%j"],
                          capture_output=True, text=True, timeout=15).stdout.rstrip("\n")
    assert info == case.job.job_name


def test_two_node_torchrun(slurm_cluster, cases):
    case = finish(slurm_cluster, cases["tr2"])
    assert_trained(case, world=4)
    text = case.script.read_text()
    assert "--rdzv_backend c10d" in text and "--rdzv_id \"shardtrain-$SLURM_JOB_ID\"" in text
    log = case.log()
    assert "node 0 (" in log and "node 1 (" in log


def test_two_node_deepspeed_launcher(slurm_cluster, cases):
    case = finish(slurm_cluster, cases["ds2"])
    assert_trained(case, world=4)
    assert (case.run_dir / "hostfile.slurm").read_text() == "n1 slots=2\nn2 slots=2\n"
    log = case.log()
    assert "node_rank=0" in log and "node_rank=1" in log


@pytest.mark.parametrize("name", ["tr2", "ds2"])
def test_preemption_checkpoint_requeue_resume(slurm_cluster, cases, name):
    """USR2 to every process of the job steps (as Slurm sends it before the time limit): the
    launchers survive it, the ranks agree on a step, save, rank 0 requeues, the job resumes there."""
    case = finish(slurm_cluster, cases[name])
    log = case.log()
    assert case.signalled_after is not None, f"never reached step {case.signal_after}:\n{log[-4000:]}"
    assert_trained(case, world=4)  # every step exactly once
    info = slurm_cluster.job_info(case.job_id)
    assert info.get("Restarts") == "1", info
    stops = [int(ln.rsplit("at step ", 1)[1].split(":")[0]) for ln in log.splitlines()
             if "[shardtrain] preempted at step" in ln]
    assert len(stops) == 1, log[-5000:]
    stop = stops[0]
    assert case.signalled_after <= stop < case.steps
    assert "restart 1:" in log
    worker0 = (case.run_dir / "logs" / "worker_rank0.log").read_text()
    assert "requeued job" in worker0 and f"at step {stop}" in worker0, worker0[-3000:]
    restarted = [m for m in train_metrics(case.run_dir) if m["step"] > stop]
    assert restarted and len(restarted) == case.steps - stop


def test_crashing_rank_fails_job_promptly(slurm_cluster, cases):
    case = finish(slurm_cluster, cases["crash"], timeout=240)
    log = case.log()
    assert case.state == "FAILED", log[-4000:]
    assert "crashes at step 3" in log
    assert len(train_metrics(case.run_dir)) < 20  # 1000 steps x 0.2 s would have taken minutes
    assert slurm_cluster.job_info(case.job_id).get("ExitCode", "0:0") != "0:0"
