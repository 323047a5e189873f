"""benchmarks/gpu_memory.py cannot rot: its --dry-run runs the whole grid on CPU (tiny model, the
project's worker, same code path as on a GPU) and prints predicted vs measured for every row."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.multiproc
def test_gpu_memory_dry_run(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_memory.py"), "--dry-run", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(out.read_text())
    rows = {r["row"]: r for r in res["rows"]}
    from importlib.util import find_spec
    for name, r in rows.items():
        if "skipped" in r:  # only when the optional package really is absent
            assert "not installed" in r["skipped"] and any(find_spec(m) is None for m in ("deepspeed", "bitsandbytes"))
            continue
        assert set(r["measured"]) == {"forward", "backward", "optimizer"}, name
        for ph, m in r["measured"].items():
            assert m["memtracker_live"] > 0, (name, ph)
        assert r["predicted"], name
    assert {"single_full", "fsdp2_full_ckpt", "lora_ckpt"} <= set(rows)
    for name in rows:
        assert name in proc.stdout
    assert "dry run" in proc.stdout
