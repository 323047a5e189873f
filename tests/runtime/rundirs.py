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
    from shardtrain.compiler.specs import Engine
    from shardtrain.config.resolve import resolve_specs
    from shardtrain.config.schema import parse_run_config
    raw = merge(BASE, overrides or {})
    cfg = parse_run_config(raw)
    p = plan(*resolve_specs(cfg))
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (d / "plan.json").write_text(json.dumps(p.to_json(), indent=1))
    if p.strategy.engine is Engine.DEEPSPEED:
        from shardtrain.emit.deepspeed import deepspeed_config
        t = cfg.train
        ds = deepspeed_config(p, grad_clip=t.grad_clip, lr=t.lr, weight_decay=t.weight_decay)
        (d / "ds_config.json").write_text(json.dumps(ds, indent=1))
    elif p.strategy.engine is Engine.FSDP:
        from shardtrain.emit.fsdp import fsdp_settings
        (d / "fsdp.json").write_text(json.dumps(fsdp_settings(p).to_dict(), indent=1))
    return d
