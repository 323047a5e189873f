"""configs/deepspeed/*.json are exactly what `shardtrain emit configs/examples/NAME.yaml --format
deepspeed` prints today (one JSON per example whose plan uses DeepSpeed, none for the others).

Regenerate after a deliberate change (planner, cost model or emitter):
    SHARDTRAIN_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_configs_drift.py
(or the per-file `shardtrain emit` commands in configs/README.md), then review the diff.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from shardtrain.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (ROOT / "configs/examples").glob("*.yaml") if not p.name.startswith("tiny-"))
OUT = ROOT / "configs/deepspeed"
REGEN = os.environ.get("SHARDTRAIN_REGEN_GOLDEN") == "1"


def _emit(example: Path, capsys) -> str | None:
    capsys.readouterr()
    rc = main(["emit", str(example), "--format", "deepspeed"])
    out, err = capsys.readouterr()
    if rc == 1 and "not DeepSpeed" in err:
        return None
    assert rc == 0, err
    return out


def test_there_are_examples():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_deepspeed_json_matches_the_tool(example, capsys):
    target = OUT / f"{example.stem}.json"
    text = _emit(example, capsys)
    if REGEN:
        OUT.mkdir(exist_ok=True)
        if text is None:
            target.unlink(missing_ok=True)
        else:
            target.write_text(text)
    if text is None:
        assert not target.exists(), f"{target.name}: the plan no longer uses DeepSpeed; delete it (or regenerate)"
    else:
        assert target.is_file(), f"{target.name} missing: regenerate (see module docstring)"
        assert target.read_text() == text, f"{target.name} drifted from `shardtrain emit`: regenerate and review"


def test_no_orphan_json():
    stems = {p.stem for p in EXAMPLES}
    assert not [p.name for p in OUT.glob("*.json") if p.stem not in stems]
