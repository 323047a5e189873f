"""Test helper: build worker run directories (run.yaml, plan.json, ds_config.json / fsdp.json) from a
config mapping with the compiler and emitters — what `shardtrain launch` writes."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "models" / "tiny-llama.json")

BASE = {
    "model": {"name": TINY},
    "hardware": {"gpus_per_node": 2},
    "train": {"seq_len": 64, "global_batch": 8, "micro_batch": 2, "precision": "fp32", "strategy": "ddp",
              "grad_ckpt": "none", "steps": 4, "lr": 1e-3, "warmup_steps": 1, "grad_clip": 1.0, "seed": 7},
    "data": {"packing": True},
    "run": {"checkpoint_every": 0, "eval_every": 0, "device": "cpu"},
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def make_run_dir(path: str | Path, overrides: dict | None = None) -> Path:
    from shardtrain.compiler.planner import plan
    from shardtrain.config.resolve import resolve_specs
    from shardtrain.config.schema import parse_run_config
    cfg = parse_run_config(merge(BASE, overrides or {}))
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_plan(d, cfg, plan(*resolve_specs(cfg)))
    return d


def write_plan(d: Path, cfg, p) -> None:
    """plan.json with its runtime facts and the engine config files, as `shardtrain launch` writes them."""
    from shardtrain.emit.runtime import engine_files, with_runtime_facts
    p = with_runtime_facts(cfg, p)
    (d / "plan.json").write_text(json.dumps(p.to_json(), indent=1))
    for name, conf in engine_files(p).items():
        (d / name).write_text(json.dumps(conf, indent=1))


def edit_plan(d: Path, edit) -> None:
    """Replace a run dir's plan by edit(plan) and re-derive its runtime facts and engine files."""
    from shardtrain.compiler.plan import Plan
    from shardtrain.config.schema import parse_run_config
    cfg = parse_run_config(yaml.safe_load((d / "run.yaml").read_text()))
    write_plan(d, cfg, edit(Plan.from_json(json.loads((d / "plan.json").read_text()))))
