"""Issue 13 (f): preflight compares the plan with the machine before anything is spawned; each problem
is one line with the fix. Machines are described with preflight.Machine (a GPU machine cannot exist
here); files, dirs and ports are real."""
from __future__ import annotations

import socket
from pathlib import Path

from shardtrain.config.pipeline import compile as compile_config
from shardtrain.launcher import preflight
from shardtrain.launcher.preflight import Machine

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "examples" / "tiny-cpu.yaml"
BIG = ROOT / "configs" / "examples" / "llama-13b-full-1x80gb-nvme.yaml"
GiB = 2**30
CPU_BOX = Machine(gpus=0, host_memory_bytes=24 * GiB, host_available_bytes=20 * GiB, cpus=2)


def _check(config, tmp_path, machine=CPU_BOX, device="cpu", nproc=2, **over):
    cfg, plan = compile_config(config, over)
    return preflight.check(cfg, plan, machine=machine, device=device, nproc=nproc, run_dir=tmp_path / "run")


def test_tiny_cpu_demo_passes(tmp_path):
    r = _check(TINY, tmp_path)
    assert r.problems == [] and any("no GPU visible" in n for n in r.notes)


def test_gpu_plan_on_cpu_machine_is_refused_with_the_fixes(tmp_path):
    r = _check(BIG, tmp_path, **{"hardware.gpus_per_node": 2})
    text = "\n".join(r.problems)
    assert "no GPU is visible here" in text and "run.device: cpu" in text  # says so, and how to force it
    assert "host RAM per node" in text and "--cpu-memory 24GiB" in text  # 128 GiB planned vs this node
    assert "nvme_path" in text and "does not exist" in text
    assert all("; fix: " in p and "\n" not in p for p in r.problems)
    forced = _check(BIG, tmp_path, **{"hardware.gpus_per_node": 2, "run.device": "cpu"})
    assert not any("no GPU is visible" in p for p in forced.problems)


def test_gpu_count_and_memory(tmp_path):
    small = Machine(gpus=1, gpu_memory_bytes=(24 * GiB,), host_memory_bytes=2048 * GiB, cpus=64)
    r = _check(TINY, tmp_path, machine=small, device="cuda", nproc=2)
    text = "\n".join(r.problems)
    assert "2 processes per node but 1 GPU(s)" in text and "--nproc-per-node 1" in text
    assert "--gpu-memory 24GiB" in text  # the preset is 80 GB


def test_processes_possible(tmp_path):
    r = _check(TINY, tmp_path, machine=Machine(gpus=0, host_memory_bytes=8 * GiB, cpus=1), nproc=2)
    assert any("1 CPU core" in p and "--nproc-per-node 1" in p for p in r.problems)


def test_data_and_model_paths(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = _check(TINY, tmp_path, **{"data.train": str(empty)})
    assert any("data.train" in p and "empty" in p for p in r.problems)
    r = _check(TINY, tmp_path, **{"data.train": str(tmp_path / "missing.jsonl")})
    assert any("data.train" in p and "does not exist" in p for p in r.problems)
    r = _check(TINY, tmp_path, **{"model.tokenizer": str(tmp_path / "no-tok")})
    assert any("model.tokenizer" in p for p in r.problems)


def test_unwritable_run_dir(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    cfg, plan = compile_config(TINY)
    r = preflight.check(cfg, plan, machine=CPU_BOX, device="cpu", nproc=2, run_dir=f / "run")
    assert any("run dir" in p and "not a directory" in p for p in r.problems)


def test_rendezvous_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg, plan = compile_config(TINY)
        r = preflight.check(cfg, plan, machine=CPU_BOX, device="cpu", nproc=2, run_dir=tmp_path / "r",
                            master_port=port)
    assert any(f"port {port} is in use" in p for p in r.problems)


def test_launch_spawns_nothing_on_preflight_failure(tmp_path, capsys):
    from shardtrain.cli import main
    rc = main(["launch", str(BIG), "--nproc-per-node", "2", "--run-dir", str(tmp_path / "run"),
               "--set", "data.train=demo"])  # a launch without data.train is refused first (issue 22)
    err = capsys.readouterr().err
    assert rc == 1 and "nothing was started" in err
    lines = [ln for ln in err.splitlines() if ln.startswith("shardtrain: error: preflight: ")]
    assert any("nvme_path" in ln for ln in lines)  # machine-independent: /local_nvme does not exist here
    assert not (tmp_path / "run").exists()


def test_cached_hub_dataset_id_passes(tmp_path, monkeypatch):
    """`data.train: ORG/NAME` from the local Hugging Face cache is what the ranks read (config/hub.py
    dataset_source, carried in plan.json): preflight must resolve it the same way, not as a local path."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--acme--notes"
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "train.jsonl").write_text("".join(
        '{"text": "note %d: the quick brown fox jumps over the lazy dog"}\n' % i for i in range(40)))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert _check(TINY, tmp_path, **{"data.train": "acme/notes"}).problems == []
    r = _check(TINY, tmp_path, **{"data.train": "acme/absent"})
    assert len(r.problems) == 1 and "hf download --repo-type dataset acme/absent" in r.problems[0]


def _with_mesh(plan, **dims):
    """The tiny plan on a forced mesh (issue 18), as the planner would write it."""
    import dataclasses
    from shardtrain.compiler.specs import ParallelDims
    return dataclasses.replace(plan, chosen=dataclasses.replace(plan.chosen, parallel=ParallelDims(**dims)))


def test_more_ranks_than_cores_needs_oversubscribe(tmp_path):
    """Issue 18: the 4-rank mesh runs on a 2-core machine only when the config says so; the refusal
    names the key."""
    r = _check(TINY, tmp_path, nproc=4)
    bad = [p for p in r.problems if "4 CPU processes" in p]
    assert len(bad) == 1 and "run.oversubscribe: true" in bad[0] and "--oversubscribe" in bad[0]
    r = _check(TINY, tmp_path, nproc=4, **{"run.oversubscribe": "true"})
    assert not any("CPU processes" in p for p in r.problems)
    assert any("run.oversubscribe" in n and "4 CPU processes share 2 core" in n for n in r.notes)


def test_ring_cp_on_cpu_is_refused_in_one_line(tmp_path):
    cfg, plan = compile_config(TINY, {})
    r = preflight.check(cfg, _with_mesh(plan, dp_shard=1, cp=2, cp_mode="ring"), machine=CPU_BOX, device="cpu",
                        nproc=2, run_dir=tmp_path / "run")
    ring = [p for p in r.problems if "ring" in p]
    assert len(ring) == 1 and "no CPU kernel" in ring[0] and "parallel.cp_mode: ulysses" in ring[0]
    assert "\n" not in ring[0]
    ok = preflight.check(cfg, _with_mesh(plan, dp_shard=1, cp=2), machine=CPU_BOX, device="cpu", nproc=2,
                         run_dir=tmp_path / "run")
    assert not any("cp_mode" in p for p in ok.problems)


def test_qlora_with_tp_is_refused(tmp_path):
    cfg, plan = compile_config(TINY, {"train.method": "qlora", "train.precision": "bf16"})
    r = preflight.check(cfg, _with_mesh(plan, tp=2), machine=CPU_BOX, device="cpu", nproc=2, run_dir=tmp_path / "run")
    assert any("QLoRA with parallel.tp 2" in p and "parallel.tp: 1" in p for p in r.problems)
    cfg, plan = compile_config(TINY, {"train.method": "lora"})  # LoRA with tp runs (tests/runtime/test_mesh_runs.py)
    r = preflight.check(cfg, _with_mesh(plan, tp=2), machine=CPU_BOX, device="cpu", nproc=2, run_dir=tmp_path / "run")
    assert not any("parallel.tp" in p for p in r.problems)
