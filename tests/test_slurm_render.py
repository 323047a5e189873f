"""Rendering of Slurm batch scripts (pure; no Slurm needed).

Golden files live in ``tests/golden/slurm/``. After an intended change to the renderer, regenerate
them with::

    SHARDTRAIN_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_slurm_render.py

and review the diff before committing.

Hostile values (spaces, quotes, ``$(…)``, backticks, ``;``) are checked three ways: ``bash -n``;
a run of the rendered script against fake ``srun``/``scontrol``/python executables that record
the argv they receive (nothing may execute, every value must arrive byte for byte); and a
re-implementation of sbatch's ``#SBATCH`` line parser (Slurm 22.05 ``src/sbatch/opt.c``,
``_get_argument``) that must read back the literal values.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from shardtrain.launcher.rankstart import PORT_BASE, PORT_SPAN
from shardtrain.slurm import SbatchJob, parse_job_id, render, sbatch_options
from shardtrain.slurm import cli as slurm_cli

GOLDEN = Path(__file__).parent / "golden" / "slurm"
REGEN = os.environ.get("SHARDTRAIN_REGEN_GOLDEN") == "1"

HOSTILE = [
    "a b",
    "it's",
    'say "hi"',
    "$(touch {mark})",
    "`touch {mark}`",
    "x; touch {mark}",
    "x && touch {mark} #",
    "$HOME ${PATH} $1 * ? [a]",
    "'; touch {mark}; echo '",
    '"; touch {mark}; echo "',
    "-n --help",
    "é ünïcode",
]


def _golden_jobs() -> dict[str, SbatchJob]:
    common = dict(
        config="/shared/configs/llama-8b.yaml",
        python="/shared/venv/bin/python",
        partition="gpu",
        time="04:00:00",
        account="ml",
        exclusive=True,
    )
    return {
        "torchrun-1node": SbatchJob(
            run_dir="/shared/runs/llama-8b-1n", nodes=1, gpus_per_node=8, launcher="torchrun",
            job_name="llama-8b-1n", **common,
        ),
        "torchrun-4node": SbatchJob(
            run_dir="/shared/runs/llama-8b-4n", nodes=4, gpus_per_node=8, launcher="torchrun",
            job_name="llama-8b-4n", qos="high", constraint="h100", mem="0", cpus_per_task=96,
            overrides=("train.steps=1000", "hardware.nodes=4", "hardware.gpus_per_node=8"),
            env=(("HF_HOME", "/shared/hf"),), **common,
        ),
        "deepspeed-1node": SbatchJob(
            run_dir="/shared/runs/llama-70b-qlora-1n", nodes=1, gpus_per_node=8,
            launcher="deepspeed", job_name="llama-70b-qlora", **common,
        ),
        "deepspeed-4node": SbatchJob(
            run_dir="/shared/runs/llama-70b-4n", nodes=4, gpus_per_node=8, launcher="deepspeed",
            job_name="llama-70b-4n", signal="SIGUSR1", signal_seconds=300, max_requeues=10,
            output="/shared/logs/%x-%j.out", cpus_per_task=96, **common,
        ),
    }


@pytest.mark.parametrize("name", sorted(_golden_jobs()))
def test_golden(name):
    text = render(_golden_jobs()[name])
    path = GOLDEN / f"{name}.sbatch"
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"missing {path}; run with SHARDTRAIN_REGEN_GOLDEN=1"
    assert text == path.read_text(), (
        f"{path} differs from the rendered script; if intended, regenerate with "
        "SHARDTRAIN_REGEN_GOLDEN=1 and review the diff"
    )


@pytest.mark.parametrize("name", sorted(_golden_jobs()))
def test_bash_n_and_structure(name, tmp_path):
    job = _golden_jobs()[name]
    text = render(job)
    assert render(job) == text  # pure: same job, same bytes
    _bash_n(text, tmp_path)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    sb = [ln for ln in lines if ln.startswith("#SBATCH")]
    # all #SBATCH lines come before the first command (sbatch stops reading at the first one)
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(lines.index(ln) < first_cmd for ln in sb)
    names = [re.match(r"#SBATCH --([a-z-]+)", ln).group(1) for ln in sb]
    assert names == sorted(names)
    assert f"#SBATCH --nodes={job.nodes}" in lines
    assert "#SBATCH --ntasks-per-node=1" in lines
    assert "#SBATCH --requeue" in lines and "#SBATCH --open-mode=append" in lines
    assert f"#SBATCH --signal={job.signal_name}@{job.signal_seconds}" in lines
    assert "$" not in "".join(sb)  # literal values only
    assert "--kill-on-bad-exit=1" in text and "--wait=60" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text
    for var in ("PYTHONUNBUFFERED", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_DEBUG",
                "PYTORCH_CUDA_ALLOC_CONF"):
        assert f"export {var}=" in text
    if job.launcher == "torchrun":
        assert "--rdzv_id \"shardtrain-$SLURM_JOB_ID\"" in text and "--rdzv_backend c10d" in text
    else:
        assert "--no_ssh" in text and '--node_rank "$SLURM_NODEID"' in text


def test_signal_and_requeue_options():
    job = SbatchJob(run_dir="/r", nodes=2, gpus_per_node=4, signal="SIGTERM", signal_seconds=0,
                    requeue=False, request_gpus=False)
    opts = sbatch_options(job)
    assert opts["signal"] == "TERM@0"
    assert "no-requeue" in opts and "requeue" not in opts
    assert "gpus-per-node" not in opts
    assert 'trap "" TERM\n' in render(job)
    assert "export SHARDTRAIN_MAX_REQUEUES=0\n" in render(job)  # --no-requeue: rank 0 must not
    assert 'trap "" USR2 TERM\n' in render(SbatchJob(run_dir="/r", nodes=1, gpus_per_node=1))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(job_name="a\nb"),
        dict(run_dir="/runs/a\nb"),
        dict(partition="gpu\r"),
        dict(run_dir=""),
        dict(config=""),
        dict(worker_module="a b"),
        dict(nodes=0),
        dict(gpus_per_node=-1),
        dict(launcher="mpirun"),
        dict(signal="USR9"),
        dict(signal="USR2; rm"),
        dict(env=(("BAD NAME", "x"),)),
        dict(env=(("$(x)", "x"),)),
        dict(cpus_per_task=0),
        dict(port_base=65000, port_span=20000),
    ],
)
def test_rejects_bad_values(kwargs):
    base = dict(run_dir="/r", nodes=1, gpus_per_node=1)
    base.update(kwargs)
    with pytest.raises(ValueError):
        SbatchJob(**base)


def test_relative_paths_are_anchored_at_the_submission_dir(tmp_path):
    job = SbatchJob(run_dir="runs/my run", nodes=1, gpus_per_node=1, config="configs/x.yaml")
    text = render(job)
    assert "export SHARDTRAIN_RUN_DIR=\"$PWD\"/'runs/my run'\n" in text
    assert "SHARDTRAIN_CONFIG=\"$PWD\"/configs/x.yaml\n" in text
    _bash_n(text, tmp_path)


def test_rejects_backslash_in_sbatch_line():
    job = SbatchJob(run_dir="/r", nodes=1, gpus_per_node=1, partition="gpu\\x")
    with pytest.raises(ValueError, match="backslash"):
        render(job)


def test_percent_in_run_dir_is_literal_in_output_pattern():
    job = SbatchJob(run_dir="/runs/100%", nodes=1, gpus_per_node=1)
    assert sbatch_options(job)["output"] == "/runs/100%%/slurm-%j.out"
    assert job.log_path("12") == "/runs/100%/slurm-12.out"
    job = SbatchJob(run_dir="/r", nodes=1, gpus_per_node=1, job_name="n", output="x/%x-%j-%N.log")
    assert job.log_path("7") == "x/n-7-%N.log"


# ---------------------------------------------------------------------------------------------
# sbatch's #SBATCH parser (Slurm 22.05 src/sbatch/opt.c: _get_argument), re-implemented


def sbatch_parse_line(line: str) -> list[str]:
    assert line.startswith("#SBATCH")
    ptr, args = line[len("#SBATCH"):], []
    i = 0
    while True:
        while i < len(ptr) and ptr[i].isspace():
            i += 1
        if i >= len(ptr):
            return args
        arg, quoted, q, escape = [], False, "", False
        while i < len(ptr) and (quoted or not ptr[i].isspace()) and ptr[i] != "\n":
            c = ptr[i]
            if escape:
                escape = False
            elif c == "\\":
                escape = True
                i += 1
                continue
            elif quoted:
                if c == q:
                    quoted = False
                    i += 1
                    continue
            elif c in "\"'":
                quoted, q = True, c
                i += 1
                continue
            elif c == "#":
                return args + (["".join(arg)] if arg else [])
            arg.append(c)
            i += 1
        args.append("".join(arg))


def _bash_n(text: str, tmp_path: Path) -> None:
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _write_exe(path: Path, body: str) -> Path:
    path.write_text(body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _fake_slurm(tmp_path: Path, nodes: int) -> tuple[Path, Path, Path]:
    """Fake scontrol + srun (runs its command once per node, like one task per node) and a fake
    python that appends its argv and a few env vars to a JSONL record file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "argv.jsonl"
    hosts = " ".join(f"node{i}" for i in range(1, nodes + 1))
    _write_exe(bindir / "scontrol", textwrap.dedent(f"""\
        #!/bin/bash
        [ "$1 $2" = "show hostnames" ] || exit 3
        for h in {hosts}; do echo "$h"; done
        """))
    _write_exe(bindir / "srun", textwrap.dedent(f"""\
        #!/bin/bash
        while [ "${{1#--}}" != "$1" ]; do shift; done
        for i in $(seq 0 $(( {nodes} - 1 ))); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" || exit $?; done
        """))
    fake_py = _write_exe(tmp_path / "fake python", textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        keys = ("SLURM_NODEID", "SHARDTRAIN_HEAD", "SHARDTRAIN_PORT", "SHARDTRAIN_RUN_DIR",
                "SHARDTRAIN_MAX_REQUEUES", "SHARDTRAIN_PREEMPT_SIGNAL", "EXTRA")
        with open({str(record)!r}, "a") as f:
            f.write(json.dumps({{"argv": sys.argv[1:],
                                "env": {{k: os.environ.get(k) for k in keys}}}}) + "\\n")
        """))
    return bindir, record, fake_py


def _run_script(text: str, tmp_path: Path, bindir: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[1-2]",
        "HOME": str(tmp_path),
    }
    return subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_values_cannot_execute(tmp_path, launcher, hostile):
    mark = tmp_path / "PWNED"
    value = hostile.replace("{mark}", str(mark))
    run_dir = tmp_path / f"run {value.replace('/', '_')}"
    run_dir.mkdir()
    (run_dir / "plan.json").write_text('{"world_size": 4}')
    bindir, record, fake_py = _fake_slurm(tmp_path, nodes=2)
    job = SbatchJob(
        run_dir=str(run_dir), nodes=2, gpus_per_node=2, launcher=launcher,
        job_name=value, partition=value, account=value, qos=value, constraint=value,
        python=str(fake_py), config=f"/cfg/{value}.yaml", overrides=(f"run.name={value}",),
        output=str(run_dir / "log %j.out"), env=(("EXTRA", value),),
    )
    text = render(job)
    _bash_n(text, tmp_path)

    # sbatch reads back the literal values
    parsed = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            (arg,) = sbatch_parse_line(line)
            key, _, val = arg.partition("=")
            parsed[key] = val
    for key in ("--job-name", "--partition", "--account", "--qos", "--constraint"):
        assert parsed[key] == value, key
    assert parsed["--output"] == str(run_dir / "log %j.out")

    proc = _run_script(text, tmp_path, bindir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not mark.exists(), "a hostile value executed"
    records = [json.loads(ln) for ln in record.read_text().splitlines()]
    assert [r["env"]["SLURM_NODEID"] for r in records] == ["0", "1"]  # expanded per node
    for r in records:
        argv, env = r["argv"], r["env"]
        assert argv[argv.index("--run-dir") + 1] == str(run_dir)
        assert env["SHARDTRAIN_RUN_DIR"] == str(run_dir)
        assert env["EXTRA"] == value
        assert env["SHARDTRAIN_HEAD"] == "node1"
        port = PORT_BASE + 4242 % PORT_SPAN  # rankstart's policy, keyed by SLURM_JOB_ID
        assert env["SHARDTRAIN_PORT"] == str(port)
        assert env["SHARDTRAIN_MAX_REQUEUES"] == "3" and env["SHARDTRAIN_PREEMPT_SIGNAL"] == "USR2"
        # the per-node command as the installed launchers' own parsers read it
        if launcher == "torchrun":
            from torch.distributed.run import get_args_parser
            assert argv[:2] == ["-m", "torch.distributed.run"]
            a = get_args_parser().parse_args(argv[2:])
            assert (a.nnodes, a.nproc_per_node, a.rdzv_backend, a.rdzv_id, a.rdzv_endpoint, a.max_restarts) == \
                ("2", "2", "c10d", "shardtrain-4242", f"node1:{port}", 0)
        else:
            from deepspeed.launcher.runner import parse_args
            assert argv[:2] == ["-m", "deepspeed.launcher.runner"]
            a = parse_args(argv[2:])
            assert a.no_ssh and a.no_local_rank and a.node_rank == int(env["SLURM_NODEID"])
            assert (a.master_addr, a.master_port, a.num_nodes, a.num_gpus) == ("node1", port, 2, 2)
            assert Path(a.hostfile).read_text() == "node1 slots=2\nnode2 slots=2\n"
            a.training_script, a.training_script_args = a.user_script, a.user_args
        assert a.module and a.training_script == "shardtrain.runtime.worker"
        assert a.training_script_args == ["--run-dir", str(run_dir)]


def test_missing_plan_runs_prepare_with_quoted_overrides(tmp_path):
    mark = tmp_path / "PWNED"
    bindir, record, fake_py = _fake_slurm(tmp_path, nodes=1)
    run_dir = tmp_path / "run"
    # the fake python also plays `-m shardtrain.slurm.cli prepare`: make it create plan.json
    fake_py.write_text(fake_py.read_text() + textwrap.dedent(f"""\
        if sys.argv[1:3] == ["-m", "shardtrain.slurm.cli"]:
            d = sys.argv[sys.argv.index("--run-dir") + 1]
            os.makedirs(d, exist_ok=True)
            open(os.path.join(d, "plan.json"), "w").write("{{}}")
        """))
    job = SbatchJob(run_dir=str(run_dir), nodes=1, gpus_per_node=2, python=str(fake_py),
                    config="/cfg/a b.yaml", overrides=(f"run.name=$(touch {mark})",))
    proc = _run_script(render(job), tmp_path, bindir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not mark.exists()
    first = json.loads(record.read_text().splitlines()[0])["argv"]
    # "$0" is the batch script (here the file bash ran): the compute node records it as command.txt
    assert first == ["-m", "shardtrain.slurm.cli", "prepare", "/cfg/a b.yaml",
                     "--set", f"run.name=$(touch {mark})", "--run-dir", str(run_dir),
                     "--command-file", str(tmp_path / "job.sbatch")]


def test_missing_plan_without_config_fails_fast(tmp_path):
    bindir, record, fake_py = _fake_slurm(tmp_path, nodes=1)
    job = SbatchJob(run_dir=str(tmp_path / "nope"), nodes=1, gpus_per_node=1, python=str(fake_py))
    proc = _run_script(render(job), tmp_path, bindir)
    assert proc.returncode == 2 and "plan.json is missing" in proc.stderr
    assert not record.exists()


def test_launcher_failure_fails_the_script(tmp_path):
    bindir, record, fake_py = _fake_slurm(tmp_path, nodes=1)
    fake_py.write_text(fake_py.read_text() + "sys.exit(7)\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "plan.json").write_text("{}")
    job = SbatchJob(run_dir=str(run_dir), nodes=1, gpus_per_node=1, python=str(fake_py))
    proc = _run_script(render(job), tmp_path, bindir)
    assert proc.returncode == 7


# ---------------------------------------------------------------------------------------------
# submit + CLI (the real run-dir preparation of a tiny model; sbatch faked on PATH)


@pytest.mark.parametrize(
    "out,expected",
    [("123\n", "123"), ("456;cluster\n", "456"), ("Submitted batch job 789\n", "789")],
)
def test_parse_job_id(out, expected):
    assert parse_job_id(out) == expected


def test_parse_job_id_rejects_garbage():
    from shardtrain.slurm import SubmitError

    with pytest.raises(SubmitError):
        parse_job_id("sbatch: error: Batch job submission failed\n")


def _parse_cli(argv):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    slurm_cli.add_sbatch_parser(sub)
    return parser.parse_args(argv)


def _tiny(tmp_path, name="run.yaml"):
    cfg = tmp_path / name
    cfg.write_text("model: {name: tiny-llama}\ntrain: {seq_len: 64, global_batch: 8}\n")
    return cfg


def test_cli_prints_script(tmp_path, capsys):
    args = _parse_cli(["sbatch", str(_tiny(tmp_path)), "--nodes", "2", "--gpus-per-node", "4",
                       "--run-dir", str(tmp_path / "r"), "--partition", "p q", "--set", "train.steps=5"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --partition='p q'" in out and "#SBATCH --nodes=2" in out
    assert "-m torch.distributed.run" in out  # a DDP plan -> torchrun
    # the run dir is prepared with the overrides the compute nodes get back
    assert "--set train.steps=5" in out and "--set hardware.nodes=2" in out
    run = yaml.safe_load((tmp_path / "r" / "run.yaml").read_text())
    assert (run["train"]["steps"], run["hardware"]["nodes"], run["hardware"]["gpus_per_node"]) == (5, 2, 4)
    assert json.loads((tmp_path / "r" / "plan.json").read_text())["world_size"] == 8


def test_cli_picks_deepspeed_for_a_zero_plan(tmp_path, capsys):
    args = _parse_cli(["sbatch", str(_tiny(tmp_path)), "--nodes", "1", "--gpus-per-node", "2",
                       "--strategy", "zero2", "--run-dir", str(tmp_path / "r"), "--script", str(tmp_path / "s.sh")])
    assert args.func(args) == 0
    assert "deepspeed.launcher.runner" in (tmp_path / "s.sh").read_text()
    assert (tmp_path / "r" / "ds_config.json").is_file()


def test_cli_reads_the_run_config_once(tmp_path, capsys, monkeypatch):
    from shardtrain.config import safe_io
    calls = []
    real = safe_io.load_mapping
    monkeypatch.setattr(safe_io, "load_mapping", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = _tiny(tmp_path)
    args = _parse_cli(["sbatch", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--run-dir", str(tmp_path / "r")])
    assert args.func(args) == 0
    assert [c for c in calls if str(c[0]) == str(cfg)] == [(str(cfg),)]  # model config files are other reads


def test_cli_submit_prints_job_id(tmp_path, capsys, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sbatch.log"
    _write_exe(bindir / "sbatch", f'#!/bin/bash\necho "$@" > {log}\necho "977;local"\n')
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    args = _parse_cli(["sbatch", str(_tiny(tmp_path)), "--nodes", "1", "--gpus-per-node", "2",
                       "--run-dir", str(tmp_path / "r"), "--submit"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == "977\n"
    assert log.read_text().split() == ["--parsable", str(tmp_path / "r" / "job.sbatch")]


# ---------------------------------------------------------------------------------------------
# slurm/*.sbatch: generated from configs/examples/*.yaml; regenerate with
# `python -m shardtrain.slurm.cli examples` (or SHARDTRAIN_REGEN_GOLDEN=1).

REPO = Path(__file__).resolve().parents[1]


def test_slurm_examples_do_not_drift(tmp_path):
    expected = slurm_cli.example_scripts(REPO)
    assert expected, "no configs/examples/*.yaml"
    if REGEN:
        slurm_cli.write_examples(REPO)
    actual = {f"slurm/{p.name}": p.read_text() for p in sorted((REPO / "slurm").glob("*.sbatch"))}
    assert sorted(actual) == sorted(expected), (
        "slurm/ does not match configs/examples/; run `python -m shardtrain.slurm.cli examples`")
    for name, text in expected.items():
        assert actual[name] == text, (
            f"{name} drifted from its config; run `python -m shardtrain.slurm.cli examples`")
        _bash_n(text, tmp_path)
        assert f"#SBATCH --job-name={Path(name).stem}" in text
