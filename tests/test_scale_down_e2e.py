"""Issue 21 (3): scale down on node loss. A two-"node" local job (two `shardtrain launch` processes, each a
torchrun agent with one CPU rank, meeting at one c10d endpoint) runs with `--min-nodes 1 --max-restarts 1`;
after step 3 node 1 is lost for good (its worker SIGKILLs its torchrun agent, then itself: nothing of that
node restarts). Node 0's worker fails on the next collective, its agent restarts the group, the elastic
rendezvous closes with the one node left, the restarted worker takes the plan compiled for one rank
(plans/world1.json: accumulation 2 -> 4, the global batch stays 8), resumes from the step-2 portable
checkpoint and finishes. Losses and final parameters match an uninterrupted 2-rank run within the
tolerance of tests/runtime/test_portable_resume.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "examples" / "tiny-cpu.yaml"
ARGS = ["--steps", "8", "--strategy", "ddp", "--nproc-per-node", "1", "--set", "run.eval_every=0",
        "--set", "run.checkpoint_every=2", "--set", "train.global_batch=8", "--set", "train.micro_batch=2"]
PARAM_ATOL = 2e-5


def _env(**extra):
    e = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


def _cmd(run_dir: Path, *more) -> list[str]:
    return ["timeout", "-k", "10", "420", sys.executable, "-m", "shardtrain", "launch", str(TINY), "--run-dir",
            str(run_dir), *ARGS, *more]


def _train(run: Path) -> list[tuple[int, float]]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r.get("kind", "train") == "train"]


@pytest.mark.multiproc
def test_a_node_lost_for_good_the_job_finishes_on_the_other(tmp_path):
    from safetensors.torch import load_file
    from shardtrain.launcher.rankstart import free_port
    ref, run = tmp_path / "ref", tmp_path / "elastic"
    r = subprocess.run(_cmd(ref, "--nnodes", "1", "--set", "hardware.gpus_per_node=2", "--nproc-per-node", "2"),
                       capture_output=True, text=True, env=_env(), cwd=ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    port = free_port()
    common = ["--nnodes", "2", "--min-nodes", "1", "--max-restarts", "1", "--rdzv-endpoint", f"127.0.0.1:{port}"]
    node0 = subprocess.Popen(_cmd(run, *common, "--node-rank", "0"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=_env(), cwd=ROOT)
    time.sleep(2)  # node 0's agent hosts the rendezvous store (--rdzv_conf is_host=1; node 1 is_host=0)
    # node 1 goes for good after step 3, whichever global rank its worker got
    node1 = subprocess.Popen(_cmd(run, *common, "--node-rank", "1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=_env(SHARDTRAIN_TEST_KILL="0:0:3:node;0:1:3:node"), cwd=ROOT)
    out1, _ = node1.communicate(timeout=460)
    out0, _ = node0.communicate(timeout=460)
    assert node1.returncode != 0, out1[-3000:]
    assert node0.returncode == 0, out0[-6000:]
    assert "--min-nodes 1: if 1 node(s) are lost: 1 node(s), 1 ranks: ddp, micro batch 2 × accumulation 4" in out0
    assert "restart 1 of 1" in out0 and "resumed at step 2" in out0, out0[-4000:]
    assert "runs on 1 ranks, not 2 (a node left): re-planned from world1.json" in out0, out0[-4000:]
    assert [s for s, _ in _train(run)] == list(range(1, 9))  # every step once: resumed at 2, no step lost
    got, want = _train(run), _train(ref)
    assert [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-5)
    state = json.loads((run / "checkpoints" / "step_8" / "trainer_state.json").read_text())
    assert (state["world_size"], state["global_batch"], state["samples_seen"]) == (1, 8, 64)
    a = load_file(str(next((run / "final").glob("*.safetensors"))))
    b = load_file(str(next((ref / "final").glob("*.safetensors"))))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= PARAM_ATOL


def test_min_nodes_flags(tmp_path, capsys):
    from shardtrain.cli import main
    from shardtrain.launcher import elastic
    from shardtrain.launcher.rankstart import torchrun_argv
    argv = torchrun_argv(nproc_per_node=2, nnodes=4, min_nnodes=2, rdzv_endpoint="h:1", rdzv_id="j")
    assert argv[argv.index("--nnodes") + 1] == "2:4"
    from torch.distributed.run import get_args_parser, parse_min_max_nnodes  # torchrun's own parser
    a = get_args_parser().parse_args(argv[1:])
    assert parse_min_max_nnodes(a.nnodes) == (2, 4)
    for rank, host in ((0, "1"), (3, "0")):  # node 0 hosts the rendezvous store: it must outlive a lost node
        a = get_args_parser().parse_args(torchrun_argv(nproc_per_node=2, nnodes=4, min_nnodes=2, node_rank=rank,
                                                       rdzv_endpoint="h:1", rdzv_id="j")[1:])
        assert a.rdzv_conf == f"is_host={host}"
    with pytest.raises(ValueError, match="max-restarts"):
        elastic.check(1, 2, 0)
    with pytest.raises(ValueError, match="between 1 and"):
        elastic.check(3, 2, 1)
    assert elastic.launcher_for(None, "deepspeed", 1, 2) == "torchrun"
    with pytest.raises(ValueError, match="no elastic node range"):
        elastic.launcher_for("deepspeed", "deepspeed", 1, 2)
    rc = main(["launch", str(TINY), "--strategy", "zero2", "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint",
               "127.0.0.1:29999", "--min-nodes", "1", "--max-restarts", "1", "--run-dir", str(tmp_path / "r"),
               "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "-m torch.distributed.run" in out and "--nnodes 1:2" in out
