"""`--model ORG/NAME[@REVISION]` from a populated local Hugging Face cache, no network (issue 12)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shardtrain.cli import main
from shardtrain.config.presets import load_model_spec

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "models" / "tiny-llama.json"
SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/SHA/config.json}."""
    repo = tmp_path / "hub" / "models--acme--tiny-chat"
    (repo / "snapshots" / SHA).mkdir(parents=True)
    shutil.copy(TINY, repo / "snapshots" / SHA / "config.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo


def test_plan_with_a_cached_hub_id(hub_cache, capsys):
    want = load_model_spec(str(TINY)).num_params
    for model in ("acme/tiny-chat", f"acme/tiny-chat@{SHA}"):
        assert main(["plan", "--model", model, "--gpus-per-node", "1", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["model"]["num_params"] == want


def test_not_cached_offline_names_the_id_and_the_fix(hub_cache, capsys):
    for model, needle in (("acme/other-model", "hf download acme/other-model config.json"),
                          ("acme/tiny-chat@v9", "--revision v9")):
        assert main(["plan", "--model", model, "--gpus-per-node", "1"]) == 1
        err = capsys.readouterr().err
        assert model.split("@")[0] in err and "HF_HUB_OFFLINE" in err and needle in err, err
        assert "Traceback" not in err and err.count("\n") == 1


def test_runtime_uses_the_cached_snapshot(hub_cache):
    from shardtrain.config.schema import parse_run_config
    from shardtrain.emit.runtime import model_ref
    from shardtrain.runtime.modeling import model_source
    cfg = parse_run_config({"model": {"name": "acme/tiny-chat"}})
    src = model_source(model_ref(cfg, None))  # resolved when the run dir is written, loaded by the ranks
    assert Path(src.model_dir) == hub_cache / "snapshots" / SHA
    assert src.config.num_hidden_layers == json.loads(TINY.read_text())["num_hidden_layers"]


def test_cli_cold_start_offline(hub_cache):
    """The acceptance line as a user types it (env read in a fresh process)."""
    proc = subprocess.run([sys.executable, "-m", "shardtrain", "plan", "--model", "acme/tiny-chat",
                           "--gpus-per-node", "1"], capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "acme/tiny-chat" in proc.stdout
