"""Issue 22, point 4 (safe defaults, no silent choices): sizes need a unit, no silent demo corpus,
ignored settings are warned about, run-dir files follow the umask, network failures are named, and
did-you-mean for misspelt flags and subcommands."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shardtrain.cli import main
from shardtrain.config.schema import ConfigError, parse_run_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "examples" / "tiny-cpu.yaml"


def run_cli(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------ 1. sizes need a unit
@pytest.mark.parametrize("value", ["80", 80, 80.0, "1.5", 1023])
def test_a_size_without_a_unit_is_refused_with_the_fix(value):
    with pytest.raises(ConfigError) as e:
        parse_run_config({"model": {"name": "tiny-llama"}, "hardware": {"gpu_memory": value}})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("hardware.gpu_memory: ") and "has no unit" in msg
    assert f"write {float(value):g}GiB" in msg


@pytest.mark.parametrize("value,want", [("80GiB", 80 * 2**30), ("80GB", 80 * 10**9), ("80B", 80),
                                        (85899345920, 85899345920), ("8.6e10", 86 * 10**9), (0, 0)])
def test_sizes_with_a_unit_or_in_bytes_still_read(value, want):
    cfg = parse_run_config({"model": {"name": "tiny-llama"}, "hardware": {"gpu_memory": value}})
    assert cfg.hardware.gpu_memory == want


def test_gpu_memory_flag_without_unit_is_one_error_line(capsys):
    rc, out, err = run_cli(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "80"], capsys)
    assert rc == 1 and not out
    assert err.strip() == "shardtrain: error: hardware.gpu_memory: 80 has no unit; write 80GiB (or 80GB; 80B if you " \
                          "mean bytes)"
    rc, out, _ = run_cli(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "80GiB", "--json"], capsys)
    assert rc == 0 and '"gpu_memory_bytes": 85899345920' in out


def test_run_config_round_trip_keeps_bytes():
    """pipeline.load re-validates RunConfig.to_dict() (ints of bytes): they must still read."""
    from shardtrain.config import pipeline
    cfg = parse_run_config({"model": {"name": "tiny-llama"}, "hardware": {"gpu_memory": "24GB", "cpu_memory": "2TiB"}})
    again = pipeline.load(cfg, {"train.seq_len": "64"})
    assert again.hardware == cfg.hardware


# ------------------------------------------------------------------ 2. the demo corpus is named or refused
def test_launch_without_data_train_is_refused(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(TINY.read_text().replace("  train: demo ", "  # train: demo "))
    rc, _, err = run_cli(["launch", cfg, "--run-dir", tmp_path / "run", "--dry-run"], capsys)
    assert rc == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("shardtrain: error: data.train is not set") and "data.train: demo" in line
    assert not (tmp_path / "run").exists()


def test_named_demo_corpus_launches(tmp_path, capsys):
    rc, out, err = run_cli(["launch", TINY, "--run-dir", tmp_path / "run", "--dry-run"], capsys)
    assert rc == 0, err
    from shardtrain import demo_corpus
    from shardtrain.config import hub
    from shardtrain.launcher.datacheck import validate_training_data
    assert hub.dataset_source("demo") == demo_corpus.CORPUS
    validate_training_data(parse_run_config({"model": {"name": "tiny-llama"}, "data": {"train": "demo"}}))
    with pytest.raises(ConfigError, match="data.train: demo"):
        validate_training_data(parse_run_config({"model": {"name": "tiny-llama"}}))


def test_emitted_plan_carries_the_demo_corpus_path():
    from shardtrain import demo_corpus
    from shardtrain.config import pipeline
    from shardtrain.emit.runtime import with_runtime_facts
    cfg, p = pipeline.compile(str(TINY))
    assert with_runtime_facts(cfg, p).runtime.data_train == str(demo_corpus.CORPUS)


def test_runtime_reads_demo_and_warns_when_unset(caplog):
    from shardtrain.runtime.data import BUNDLED_CORPUS, train_source
    assert train_source("demo") == BUNDLED_CORPUS
    assert train_source("x.jsonl") == "x.jsonl"
    with caplog.at_level("WARNING", logger="shardtrain.data"):
        assert train_source(None) == BUNDLED_CORPUS
    assert "data.train is not set" in caplog.text


# ------------------------------------------------------------------ 6. run-dir files follow the umask
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_run_dir_files_follow_the_umask(tmp_path, umask, mode):
    from shardtrain.config import pipeline
    from shardtrain.launcher.rundir import write_run_dir
    cfg, p = pipeline.compile(str(TINY), {"train.strategy": "zero2"})
    old = os.umask(umask)
    try:
        write_run_dir(tmp_path / "run", cfg, p, command_text="echo hi\n")
    finally:
        os.umask(old)
    files = [f for f in (tmp_path / "run").iterdir() if f.is_file()]
    assert {f.name for f in files} >= {"plan.json", "run.yaml", "ds_config.json", "command.txt"}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == mode, (f.name, oct(f.stat().st_mode))
    assert not [f for f in (tmp_path / "run").iterdir() if f.name.startswith(".")]  # no temp file left


# ------------------------------------------------------------------ 3. ignored settings are warned about
def _warnings(raw: dict) -> list[str]:
    from shardtrain.config.ignored import ignored_settings
    return ignored_settings(parse_run_config({"model": {"name": "tiny-llama"}, **raw}))


@pytest.mark.parametrize("raw,key", [
    ({"lora": {"rank": 8}}, "lora.rank"),
    ({"model": {"name": "tiny-llama", "hidden": 64}}, "model.hidden"),
    ({"train": {"grad_ckpt": "full", "selective_every": 3}}, "train.selective_every"),
    ({"train": {"loss": "full", "loss_chunk_tokens": 256}}, "train.loss_chunk_tokens"),
    ({"hardware": {"nvme_capacity": "2TB"}}, "hardware.nvme_capacity"),
    ({"hardware": {"nvme_path": "/nvme"}, "train": {"strategy": "zero2"}}, "hardware.nvme_path"),
    ({"hardware": {"inter_node_bandwidth": "25GB"}}, "hardware.inter_node_bandwidth"),
    ({"data": {"eval": "e.jsonl", "eval_fraction": 0.2}}, "data.eval_fraction"),
    ({"run": {"eval_every": 0, "eval_batches": 8}}, "run.eval_batches"),
    ({"run": {"export": "merged"}}, "run.export"),
])
def test_an_ignored_setting_gets_one_line(raw, key):
    lines = _warnings(raw)
    assert len(lines) == 1 and lines[0].startswith(key) and "ignored" in lines[0] and "\n" not in lines[0]


@pytest.mark.parametrize("raw", [
    {"train": {"method": "lora"}, "lora": {"rank": 8}},
    {"train": {"allow_method_change": True}, "lora": {"rank": 8}},  # the planner may switch to LoRA
    {"train": {"grad_ckpt": "selective", "selective_every": 3}},
    {"train": {"grad_ckpt": "auto", "selective_every": 3}},
    {"train": {"loss": "auto", "loss_chunk_tokens": 256}},
    {"hardware": {"nvme_path": "/nvme", "nvme_capacity": "2TB"}},
    {"hardware": {"nodes": 2, "inter_node_bandwidth": "25GB"}},
    {"lora": {"rank": 16}},  # the default: nothing was set
    {"train": {"method": "lora"}, "run": {"export": "both"}},
])
def test_settings_that_count_are_not_warned_about(raw):
    assert _warnings(raw) == []


def test_every_example_config_is_warning_free():
    from shardtrain.config.ignored import ignored_settings
    from shardtrain.config.schema import load_run_config
    for f in sorted((ROOT / "configs" / "examples").glob("*.yaml")):
        assert ignored_settings(load_run_config(f)) == [], f.name


def test_ignored_warning_is_printed_once_on_the_cli(capsys, monkeypatch):
    from shardtrain.config import ignored
    monkeypatch.setattr(ignored, "_PRINTED", set())  # other tests in this process printed it already
    rc, _, err = run_cli(["plan", "--model", "llama-3.1-8b", "--lora-rank", "8", "--set", "train.seq_len=1024",
                          "--json"], capsys)
    assert rc == 0
    lines = [ln for ln in err.splitlines() if ln.startswith("shardtrain: warning: lora.rank: ignored")]
    assert len(lines) == 1, err


# ------------------------------------------------------------------ 9. did-you-mean
@pytest.mark.parametrize("argv,hint", [
    (["pln", "--model", "x"], "did you mean 'plan'?"),
    (["lanch"], "did you mean 'launch'?"),
    (["plan", "--model", "llama-3.1-8b", "--seq-lne", "2048"], "did you mean --seq-len?"),
    (["plan", "--model", "llama-3.1-8b", "--gpu-memroy=80GiB"], "did you mean --gpu-memory?"),
    (["emit", "--model", "llama-3.1-8b", "--fromat", "json"], "did you mean --format?"),
    (["emit", "--model", "llama-3.1-8b", "--format", "deepspeeed"], "did you mean 'deepspeed'?"),
])
def test_did_you_mean(argv, hint, capsys):
    rc, _, err = run_cli(argv, capsys)
    assert rc == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("shardtrain") and last.endswith(hint), last


def test_no_suggestion_for_nonsense(capsys):
    rc, _, err = run_cli(["plan", "--model", "llama-3.1-8b", "--zzzzqq"], capsys)
    assert rc == 2 and err.strip().splitlines()[-1].endswith("unrecognized arguments: --zzzzqq")


# ------------------------------------------------------------------ 7. network failures are named as such
def _closed_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connection is refused at once
    return port


def test_unreachable_hub_is_named_in_seconds(tmp_path):
    """huggingface_hub's hf_hub_download backs off ~23 s on a dead network and then says the file is not
    cached (an EntryNotFoundError: "has no config.json"); the probe names the network at once."""
    import subprocess
    import sys
    import time
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_HUB_CACHE", None)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "shardtrain", "plan", "--model", "acme/some-model"], env=env,
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    took = time.monotonic() - t0
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]
    assert "could not reach the Hugging Face Hub (network" in line and "hf download acme/some-model" in line, line
    assert "has no config.json" not in line and "Traceback" not in r.stderr
    assert took < 15, took


def test_network_cause_is_found_through_huggingface_hubs_wrapping():
    from huggingface_hub import errors as E
    from shardtrain.config import hub
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as net:
            raise E.LocalEntryNotFoundError("cannot find the requested files in the local cache") from net
    except E.LocalEntryNotFoundError as e:
        assert isinstance(hub.network_cause(e), ConnectionRefusedError)
        msg = str(hub._download_error(e, "acme/m", "acme/m", None))
    assert msg.startswith("could not reach the Hugging Face Hub (network") and "has no config.json" not in msg
    assert hub.network_cause(E.EntryNotFoundError("gone")) is None
    assert "has no config.json" in str(hub._download_error(E.EntryNotFoundError("gone"), "acme/m", "acme/m", None))


@pytest.mark.parametrize("path", ["data/train.jsonl", "./train.jsonl", "/nonexistent/train.parquet",
                                  "corpus/train", "~/nope.txt"])
def test_a_missing_local_data_path_is_no_such_file(tmp_path, monkeypatch, path):
    from shardtrain.config import hub
    from shardtrain.launcher.datacheck import validate_training_data
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()  # `corpus/train`: its first component is a local directory
    assert hub.looks_local(path) and not hub.is_hub_id(path)
    with pytest.raises(ConfigError) as e:
        validate_training_data(parse_run_config({"model": {"name": "tiny-llama"}, "data": {"train": path}}))
    assert "no such file or directory" in str(e.value) and "hf download" not in str(e.value)


def test_a_hub_dataset_id_still_gets_the_download_hint(tmp_path, monkeypatch):
    from shardtrain.config import hub
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hub.is_hub_id("acme/chat-data") and not hub.looks_local("acme/chat-data")
    with pytest.raises(ValueError, match="hf download --repo-type dataset acme/chat-data"):
        hub.dataset_source("acme/chat-data")
