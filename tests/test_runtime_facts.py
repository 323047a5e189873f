"""plan.json's runtime facts (compiler/facts.py, emit/runtime.py): what the ranks read instead of the
config package, the compiler's internals and the emitters (issue 9)."""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "runtime"))

from rundirs import make_run_dir  # noqa: E402
from shardtrain.compiler.plan import Plan  # noqa: E402

ALLOWED = {"shardtrain.compiler.plan", "shardtrain.compiler.specs"}


def _shardtrain_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shardtrain"):
            out |= {node.module} if node.module != "shardtrain" else {f"shardtrain.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("shardtrain")}
    return out


def test_runtime_imports_only_the_plan_and_its_enums():
    bad = {}
    for f in sorted((ROOT / "shardtrain" / "runtime").glob("*.py")):
        mods = {m for m in _shardtrain_imports(f)
                if m.split(".")[1] in ("config", "compiler", "emit", "launcher", "slurm", "cli") and m not in ALLOWED}
        if mods:
            bad[f.name] = sorted(mods)
    assert not bad, bad


def test_emit_and_compiler_import_no_torch_or_transformers():
    for pkg in ("emit", "compiler"):
        for f in sorted((ROOT / "shardtrain" / pkg).glob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                assert not [n for n in names if n.split(".")[0] in ("torch", "transformers")], (f, names)


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp_full_shard"])
def test_run_dir_plan_carries_the_facts_and_round_trips(tmp_path, strategy):
    from shardtrain.runtime.build import read_run_dir
    d = make_run_dir(tmp_path / strategy, {"train": {"strategy": strategy}})
    raw = json.loads((d / "plan.json").read_text())
    plan = Plan.from_json(raw)
    assert plan.to_json() == raw and plan.runtime is not None
    rt = plan.runtime
    assert rt.model.hf_config["model_type"] == "llama" and rt.model.checkpoint_dir is None
    assert (rt.deepspeed is not None) == (strategy == "zero3") and (rt.fsdp is not None) == strategy.startswith("fsdp")
    assert rt.state_bytes.params > 0 and rt.model_flops_per_token > 0
    assert "runtime" not in Plan.from_json({k: v for k, v in raw.items() if k != "runtime"}).to_json()
    cfg, again = read_run_dir(d)
    assert again == plan and cfg.train.seed == 7


def test_deepspeed_optimizer_facts():
    """Who builds the optimizer: DeepSpeed from the config's block, or the runtime (8-bit AdamW; Lion on a
    CPU-only host, where DeepSpeed's Lion is the CUDA-only FusedLion)."""
    from shardtrain.config.schema import parse_run_config
    from shardtrain.emit.runtime import runtime_facts
    from rundirs import BASE, merge
    from shardtrain.compiler.planner import plan
    from shardtrain.config.resolve import resolve_specs
    got = {}
    for opt in ("adamw", "adamw8bit", "lion"):
        cfg = parse_run_config(merge(BASE, {"train": {"strategy": "zero2", "optimizer": opt, "precision": "bf16"}}))
        rt = runtime_facts(cfg, plan(*resolve_specs(cfg)))
        got[opt] = (rt.deepspeed_client_optimizer, rt.deepspeed_cpu_config is not None, "optimizer" in rt.deepspeed)
    assert got == {"adamw": (False, False, True), "adamw8bit": (True, False, False), "lion": (False, True, True)}


def test_ranks_refuse_an_edited_engine_file_and_a_bare_plan(tmp_path):
    from shardtrain.runtime.build import read_run_dir
    d = make_run_dir(tmp_path / "z", {"train": {"strategy": "zero2"}})
    ds = json.loads((d / "ds_config.json").read_text())
    ds["zero_optimization"]["reduce_bucket_size"] = 123
    (d / "ds_config.json").write_text(json.dumps(ds))
    with pytest.raises(ValueError, match=r"zero_optimization\.reduce_bucket_size is 123 but the plan"):
        read_run_dir(d)
    raw = json.loads((d / "plan.json").read_text())
    del raw["runtime"]
    (d / "plan.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="no \"runtime\" facts"):
        read_run_dir(d)
