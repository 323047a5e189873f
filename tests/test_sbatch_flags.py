"""`shardtrain sbatch` takes the same plan flags as plan/emit/check/launch (issue 12)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from shardtrain.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_sbatch_accepts_plan_flags(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["sbatch", str(ROOT / "configs/examples/llama3-8b-full-8x80gb.yaml"), "--model", "llama-3.2-1b",
                 "--seq-len", "1024", "--micro-batch", "1", "--nodes", "2", "--gpus-per-node", "8",
                 "--run-dir", str(run)])
    script = capsys.readouterr().out
    assert code == 0
    # the compute nodes re-prepare with the same overrides, and the prepared run dir already has them
    assert "--set model.name=llama-3.2-1b" in script and "--set train.seq_len=1024" in script
    cfg = yaml.safe_load((run / "run.yaml").read_text())
    assert cfg["model"]["name"] == "llama-3.2-1b" and cfg["train"]["seq_len"] == 1024
    assert cfg["hardware"]["nodes"] == 2 and cfg["hardware"]["gpus_per_node"] == 8


def _sbatch(argv, capsys) -> str:
    assert main(["sbatch", *argv]) == 0
    return capsys.readouterr().out


def _sbatch_lines(script: str) -> dict[str, str]:
    """{option: value} of the #SBATCH lines (value '' for a flag)."""
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            name, _, value = line[len("#SBATCH --"):].partition("=")
            out[name] = value
    return out


# --------------------------------------------------------------------- issue 22, point 5
def test_sbatch_flags_only_prepares_and_reprepares_from_run_yaml(tmp_path, capsys):
    """No YAML: the flags are the config; a job whose run dir lost plan.json re-prepares from the
    run dir's own run.yaml and gets the same plan (before issue 22 this was refused)."""
    from shardtrain.slurm import cli as slurm_cli
    run = tmp_path / "run"
    script = _sbatch(["--model", "tiny-llama", "--seq-len", "64", "--global-batch", "8", "--nodes", "2",
                      "--gpus-per-node", "2", "--steps", "5", "--run-dir", str(run)], capsys)
    opts = _sbatch_lines(script)
    assert (opts["nodes"], opts["gpus-per-node"]) == ("2", "2")
    cfg = yaml.safe_load((run / "run.yaml").read_text())
    assert cfg["model"]["name"] == "tiny-llama" and cfg["train"]["steps"] == 5
    # no YAML to point at: the job re-prepares from run.yaml, which already holds every flag
    assert f"SHARDTRAIN_CONFIG={run / 'run.yaml'}" in script and "--set " not in script
    plan = (run / "plan.json").read_text()
    (run / "plan.json").unlink()
    assert slurm_cli.main(["prepare", str(run / "run.yaml"), "--run-dir", str(run)]) == 0
    assert (run / "plan.json").read_text() == plan


def test_sbatch_flags_only_without_a_model_names_the_missing_key(tmp_path, capsys):
    code = main(["sbatch", "--nodes", "1", "--gpus-per-node", "2", "--run-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code != 0 and "model" in err and "Traceback" not in err
    assert "give RUN.yaml" not in err


def test_sbatch_takes_nodes_and_gpus_from_the_yaml(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {name: tiny-llama}\nhardware: {nodes: 2, gpus_per_node: 4}\n"
                   "train: {seq_len: 64, global_batch: 16}\n")
    script = _sbatch([str(cfg), "--run-dir", str(tmp_path / "r")], capsys)
    opts = _sbatch_lines(script)
    assert (opts["nodes"], opts["gpus-per-node"]) == ("2", "4")
    assert "--nnodes 2" in script and "--nproc_per_node 4" in script
    assert "hardware.nodes" not in script  # nothing to override: the YAML says it
    assert yaml.safe_load((tmp_path / "r" / "run.yaml").read_text())["hardware"]["nodes"] == 2
    # a flag still wins over the YAML
    script = _sbatch([str(cfg), "--nodes", "4", "--run-dir", str(tmp_path / "r4")], capsys)
    assert _sbatch_lines(script)["nodes"] == "4" and "--set hardware.nodes=4" in script
    assert _sbatch_lines(script)["gpus-per-node"] == "4"


def test_sbatch_requests_cpus_and_mem_from_the_plan(tmp_path, capsys):
    import math
    from shardtrain.slurm.resources import CPUS_PER_RANK, HOST_RAM_MARGIN
    run = tmp_path / "r"
    script = _sbatch([str(ROOT / "configs/examples/llama3-8b-full-8x80gb.yaml"), "--nodes", "2",
                      "--run-dir", str(run)], capsys)
    opts = _sbatch_lines(script)
    assert list(opts) == sorted(opts)  # the renderer's sorted form
    plan = json.loads((run / "plan.json").read_text())
    host = plan["cpu_memory_per_node_bytes"]
    assert opts["cpus-per-task"] == str(8 * CPUS_PER_RANK)  # one launcher task runs all 8 local ranks
    assert opts["mem"] == f"{math.ceil(host * HOST_RAM_MARGIN / 2**30)}G"
    assert f"--cpus-per-task={8 * CPUS_PER_RANK} " in script  # the srun step gets them too
    # both overridable; the values are quoted like any other #SBATCH value
    script = _sbatch([str(ROOT / "configs/examples/llama3-8b-full-8x80gb.yaml"), "--nodes", "2",
                      "--cpus-per-task", "12", "--mem", "500 G", "--run-dir", str(run)], capsys)
    assert "#SBATCH --cpus-per-task=12" in script and "#SBATCH --mem='500 G'" in script


def test_cpus_and_mem_follow_the_plan():
    """An offloaded optimizer asks for the cores CPU Adam is costed with; on CPU the ranks' "GPU"
    memory is host RAM too; the margin never asks for more RAM than the node has."""
    import math
    from shardtrain.config import pipeline
    from shardtrain.slurm import resources
    base = {"model": {"name": "tiny-llama"}, "hardware": {"gpus_per_node": 1},
            "train": {"seq_len": 64, "global_batch": 4}}
    _, ddp = pipeline.compile(base)
    _, off = pipeline.compile(base, {"train.strategy": "zero2_offload"})
    assert resources.cpus_per_task(ddp) == resources.CPUS_PER_RANK
    assert resources.cpus_per_task(off) == resources.CPU_ADAM_CPUS_PER_NODE
    gpu = resources.host_bytes_per_node(ddp, on_cpu=False)
    cpu = resources.host_bytes_per_node(ddp, on_cpu=True)
    assert gpu == ddp.chosen.cpu_memory_per_node_bytes and cpu == gpu + ddp.chosen.per_gpu.total
    # node RAM just above the need: the margin is cut to the node's RAM
    assert resources.mem_per_node(ddp, on_cpu=False) == f"{math.ceil(gpu * resources.HOST_RAM_MARGIN / 2**30)}G"
    tight = math.ceil(gpu / 2**20) + 64  # MiB: above the need, below need × margin
    _, p = pipeline.compile(base, {"hardware.cpu_memory": f"{tight}MiB"})
    assert p.chosen.fits and p.chosen.cpu_memory_per_node_bytes == gpu
    assert gpu * resources.HOST_RAM_MARGIN > tight * 2**20
    assert resources.mem_per_node(p, on_cpu=False) == f"{tight}M"


def test_cpu_device_requests_no_gpus(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {name: tiny-llama}\nhardware: {gpus_per_node: 2}\n"
                   "train: {seq_len: 64, global_batch: 8}\nrun: {device: cpu}\n")
    script = _sbatch([str(cfg), "--run-dir", str(tmp_path / "r")], capsys)
    assert "gpus-per-node" not in _sbatch_lines(script)
    assert "no GPU requested (CPU/gloo)" in script


def test_command_txt_is_the_job_not_this_machine(tmp_path, capsys):
    """command.txt of a run dir prepared by sbatch on this GPU-less machine describes the GPU job
    (before issue 22 it said CPU/gloo with DS_ACCELERATOR=cpu: the machine that wrote it)."""
    run = tmp_path / "r"
    script = _sbatch(["--model", "tiny-llama", "--seq-len", "64", "--global-batch", "16", "--nodes", "2",
                      "--gpus-per-node", "4", "--run-dir", str(run)], capsys)
    cmd = (run / "command.txt").read_text()
    assert cmd == script
    assert "CUDA/nccl" in cmd and "CPU/gloo" not in cmd and "DS_ACCELERATOR" not in cmd
    assert "#SBATCH --nodes=2" in cmd and "#SBATCH --gpus-per-node=4" in cmd


def test_command_txt_of_a_plain_prepare_comes_from_the_plan(tmp_path):
    from shardtrain.launcher.rundir import prepare_run_dir
    raw = {"model": {"name": "tiny-llama"}, "hardware": {"nodes": 2, "gpus_per_node": 4},
           "train": {"seq_len": 64, "global_batch": 16}}
    cmd = (prepare_run_dir(raw, {}, tmp_path / "a") / "command.txt").read_text()
    assert "2 node(s) × 4 processes" in cmd and "CUDA/nccl" in cmd
    assert "DS_ACCELERATOR" not in cmd and "--nnodes 2" in cmd and "--nproc_per_node 4" in cmd
    cmd = (prepare_run_dir(raw, {"run.device": "cpu"}, tmp_path / "b") / "command.txt").read_text()
    assert "CPU/gloo" in cmd and "export DS_ACCELERATOR=cpu" in cmd


def test_prepare_in_the_job_records_the_batch_script(tmp_path, capsys):
    """What a rendered script runs on the compute node when plan.json is missing: command.txt = the
    batch script ($0); an unreadable one falls back to the plan's command with a note."""
    from shardtrain.slurm import cli as slurm_cli
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {name: tiny-llama}\ntrain: {seq_len: 64, global_batch: 8}\n")
    job = tmp_path / "slurm_script"
    job.write_text("#!/bin/bash\n#SBATCH --nodes=1\necho job\n")
    assert slurm_cli.main(["prepare", str(cfg), "--run-dir", str(tmp_path / "a"), "--command-file", str(job)]) == 0
    assert (tmp_path / "a" / "command.txt").read_text() == job.read_text()
    assert slurm_cli.main(["prepare", str(cfg), "--run-dir", str(tmp_path / "b"),
                           "--command-file", str(tmp_path / "gone")]) == 0
    assert "cannot read the batch script" in capsys.readouterr().err
    assert "torch.distributed.run" in (tmp_path / "b" / "command.txt").read_text()


def test_rendered_script_reprepares_with_its_own_text(tmp_path, capsys):
    """The rendered script itself (fake srun/scontrol, the real `prepare`): a flags-only job whose
    run dir lost plan.json and command.txt gets both back, command.txt = the script bash ran."""
    import os
    import subprocess
    import sys
    import textwrap
    run = tmp_path / "run"
    script_path = tmp_path / "job.sbatch"
    _sbatch(["--model", "tiny-llama", "--seq-len", "64", "--global-batch", "8", "--gpus-per-node", "2",
             "--run-dir", str(run), "--script", str(script_path)], capsys)
    plan = (run / "plan.json").read_text()
    (run / "plan.json").unlink()
    (run / "command.txt").unlink()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    (bindir / "srun").write_text("#!/bin/bash\necho srun \"$@\" > /dev/null\n")  # no launcher here
    for exe in bindir.iterdir():
        exe.chmod(0o755)
    # the script's python: the real one for `prepare`, nothing else runs
    py = tmp_path / "py"
    py.write_text(textwrap.dedent(f"""\
        #!/bin/bash
        [ "$2" = shardtrain.slurm.cli ] && exec {sys.executable} "$@"
        exit 9
        """))
    py.chmod(0o755)
    text = script_path.read_text().replace(f"SHARDTRAIN_PYTHON={sys.executable}", f"SHARDTRAIN_PYTHON={py}")
    script_path.write_text(text)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node1",
           "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), **{k: v for k, v in os.environ.items()
                                                               if k in ("HF_HUB_OFFLINE", "DS_ACCELERATOR")}}
    proc = subprocess.run(["bash", str(script_path)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (run / "plan.json").read_text() == plan
    assert (run / "command.txt").read_text() == text
