"""Issue 13 (b): crash-safe checkpoint directories (shardtrain/runtime/ckpt_files.py) and the
single-process parts of checkpoint.py: partial / corrupt checkpoints are skipped with ONE warning line,
resume takes the newest complete one, the last K are kept, the free-disk preflight fails before writing,
and every file loads with torch.load(weights_only=True)."""
from __future__ import annotations

import json
import logging
import os
import random

import numpy as np
import pytest
import torch

from shardtrain.runtime import ckpt_files as F


def _make(root, step: int, payload: bytes = b"x" * 1000) -> object:
    """A checkpoint written the way save_checkpoint writes one: into .tmp_step_N, then sealed."""
    tmp = root / "checkpoints" / f".tmp_step_{step}"
    (tmp / "dcp").mkdir(parents=True)
    (tmp / "dcp" / "__0_0.distcp").write_bytes(payload)
    (tmp / "dcp" / "__1_0.distcp").write_bytes(payload)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    final = root / "checkpoints" / f"step_{step}"
    F.seal(tmp, final)
    return final


def test_seal_order_and_pointer(tmp_path):
    d = _make(tmp_path, 2)
    assert not (tmp_path / "checkpoints" / ".tmp_step_2").exists()
    assert (d / F.COMPLETE).is_file() and F.verify(d) is None
    man = json.loads((d / F.MANIFEST).read_text())["files"]
    assert man == {"dcp/__0_0.distcp": 1000, "dcp/__1_0.distcp": 1000,
                   "trainer_state.json": len(json.dumps({"step": 2}))}
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_2"
    _make(tmp_path, 4)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_4"


@pytest.mark.parametrize("damage", ["truncate", "missing_shard", "bad_json", "no_complete", "bad_manifest"])
def test_damaged_newest_is_skipped_with_one_warning(tmp_path, caplog, damage):
    _make(tmp_path, 2)
    d4 = _make(tmp_path, 4)
    if damage == "truncate":
        with open(d4 / "dcp" / "__1_0.distcp", "r+b") as f:
            f.truncate(10)
    elif damage == "missing_shard":
        (d4 / "dcp" / "__0_0.distcp").unlink()
    elif damage == "bad_json":
        (d4 / "trainer_state.json").write_text('{"step": 4')
    elif damage == "no_complete":
        (d4 / F.COMPLETE).unlink()
    else:
        (d4 / F.MANIFEST).write_text("[")
    with caplog.at_level(logging.WARNING, logger="shardtrain.checkpoint"):
        got = F.newest_complete(tmp_path)
    assert got[0] == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "step_4" in lines[0] and "skipping" in lines[0], lines


def test_crash_during_save_leaves_previous_loadable(tmp_path):
    """A save killed before the rename leaves only .tmp_step_N: invisible to resume, swept later."""
    _make(tmp_path, 2)
    tmp = tmp_path / "checkpoints" / ".tmp_step_4"
    tmp.mkdir()
    (tmp / "model.pt").write_bytes(b"half")
    assert F.newest_complete(tmp_path)[0] == 2
    F.sweep_temporaries(tmp_path / "checkpoints")
    assert not tmp.exists() and F.newest_complete(tmp_path)[0] == 2


def test_keep_last_k(tmp_path):
    for s in (1, 2, 3, 4, 5):
        _make(tmp_path, s)
        F.prune(tmp_path / "checkpoints", 2)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert left == ["step_4", "step_5"]


def test_resave_same_step_replaces(tmp_path):
    _make(tmp_path, 3, b"a" * 10)
    d = _make(tmp_path, 3, b"b" * 20)
    assert F.verify(d) is None and (d / "dcp" / "__0_0.distcp").read_bytes() == b"b" * 20


def test_no_checkpoint(tmp_path):
    assert F.newest_complete(tmp_path) is None


# --------------------------------------------------------------- checkpoint.py on a 1-rank gloo group
@pytest.fixture
def group(tmp_path):
    import torch.distributed as dist
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class _Eng:
    """The attributes save_checkpoint/load_checkpoint use of a DDP engine (runtime/engines.py)."""
    def __init__(self):
        from shardtrain.compiler.specs import Engine
        torch.manual_seed(0)
        self.kind, self.device, self.scaler = Engine.DDP, torch.device("cpu"), None
        self.model = torch.nn.Linear(8, 8)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.model(torch.randn(2, 8)).sum().backward()
        self.optimizer.step()


def test_save_load_roundtrip_rng_and_weights_only(tmp_path, group, monkeypatch):
    from shardtrain.runtime import checkpoint as ck
    eng = _Eng()
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    d = ck.save_checkpoint(eng, tmp_path, 3, {"step": 3, "samples_seen": 24}, keep=2)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    for f in d.rglob("*.pt"):  # every file loads without unpickling code
        torch.load(f, weights_only=True)
    with torch.no_grad():
        eng.model.weight.zero_()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    state = ck.load_checkpoint(eng, ck.latest_checkpoint(tmp_path)[1])
    assert state == {"step": 3, "samples_seen": 24}
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
    assert eng.model.weight.abs().sum() > 0
    for s in (4, 5, 6):
        ck.save_checkpoint(eng, tmp_path, s, {"step": s}, keep=2)
    assert [n for n, _ in F.complete_steps(tmp_path / "checkpoints")] == [5, 6]


def test_free_disk_preflight_fails_before_writing(tmp_path, group, monkeypatch):
    from shardtrain.runtime import checkpoint as ck
    eng = _Eng()
    monkeypatch.setenv(F.TEST_FREE_BYTES_ENV, "100")
    with pytest.raises(ck.CheckpointSpaceError, match="free.*keep_checkpoints"):
        ck.save_checkpoint(eng, tmp_path, 1, {"step": 1})
    assert not any(p.name.startswith(("step_", ".tmp_")) for p in (tmp_path / "checkpoints").iterdir())
    monkeypatch.setenv(F.TEST_FREE_BYTES_ENV, str(10**9))
    ck.save_checkpoint(eng, tmp_path, 1, {"step": 1})
    assert F.newest_complete(tmp_path)[0] == 1
    assert os.environ[F.TEST_FREE_BYTES_ENV]
