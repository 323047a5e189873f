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


#: Packages the planner and the emitters never load: `plan` / `emit` run on a login node without them.
ENGINES = ("torch", "transformers", "deepspeed", "accelerate", "peft", "bitsandbytes")
#: The `shardtrain check` modules: the one place in emit/ that imports the engines, inside the checks (a file is
#: judged by the installed code that reads it: DeepSpeed's config model, accelerate's launcher, transformers'
#: TrainingArguments / HfTrainerDeepSpeedConfig / BitsAndBytesConfig, peft's LoraConfig, torchrun's parser).
CHECK_MODULES = {"check.py", "check_bundle.py", "check_hf.py", "engine_schema.py"}


def _engine_imports(f: Path) -> tuple[list[str], list[str]]:
    """(module-level engine imports, engine imports inside functions) of ``f``; importlib.import_module
    counts as an import (a string would otherwise hide one from this rule)."""
    top, local = [], []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names = [child.module or ""] if isinstance(child, ast.ImportFrom) else \
                [a.name for a in child.names] if isinstance(child, ast.Import) else []
            if isinstance(child, ast.Call) and getattr(child.func, "attr", "") == "import_module":
                names = [getattr(child.args[0], "value", "<computed>") if child.args else "<computed>"]
            for n in names:
                if n.split(".")[0] in ENGINES or n == "<computed>":
                    (local if inner else top).append(n)
            visit(child, inner)
    visit(ast.parse(f.read_text()), False)
    return top, local


def test_emit_and_compiler_import_no_torch_or_transformers():
    """No module-level engine import in emit/ or compiler/; inside functions only in the check modules."""
    for pkg in ("emit", "compiler"):
        for f in sorted((ROOT / "shardtrain" / pkg).glob("*.py")):
            top, local = _engine_imports(f)
            assert not top, (f, top)
            if not (pkg == "emit" and f.name in CHECK_MODULES):
                assert not local, (f, local)


@pytest.mark.parametrize("strategy,method", [("ddp", "qlora"), ("zero3", "lora"), ("fsdp_full_shard", "full")])
def test_emit_loads_no_engine(tmp_path, strategy, method):
    """What the rule is for: `shardtrain emit --out` (every bundle file, the Trainer's included) in a fresh
    interpreter loads none of the engines."""
    import subprocess
    code = ("import sys; from shardtrain.cli import main; rc = main(sys.argv[1:]); "
            f"print(rc, sorted({{m.split('.')[0] for m in sys.modules}} & set({ENGINES!r})))")
    r = subprocess.run([sys.executable, "-c", code, "emit", "--model", "qwen2.5-7b", "--method", method,
                        "--strategy", strategy, "--gpus-per-node", "8", "--gpu", "a100-80gb", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "0 []", (r.stdout, r.stderr)
    assert (tmp_path / "trainer_args.json").is_file() and (tmp_path / "README.md").is_file()


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
