"""Session fixtures: each launches ONE 2-rank torchrun running several worker scenarios
(tests/runtime/driver.py); the test functions then check the recorded results and run dirs.

Launches: torch engines (DDP / FSDP2), DeepSpeed ZeRO, LoRA/QLoRA (from a saved tiny checkpoint),
resume after pre-emption (all three engines). DeepSpeed's C++ ops must be prebuilt
(`python .ci/build_ds_ops.py`): several ranks JIT-compiling at once hang.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rundirs import edit_plan, make_run_dir  # noqa: E402

LAUNCH_TIMEOUT_S = 420
STEPS = 4


def run_driver(base: Path, scenarios: list[dict], nproc: int = 2, timeout: int = LAUNCH_TIMEOUT_S, *,
               threads: int = 1, keep_going: bool = False) -> dict:
    """scenarios: [{"name", "over" (config overrides) | "run_dir", "probe"?, "env"?, "plan_edit"?}].
    `threads`: OMP threads per rank. `keep_going`: a failed launch raises nothing; the scenarios that ran
    keep their results and the others get {"error": ...} (a scenario that raises stops the launch)."""
    specs = []
    for sc in scenarios:
        d = Path(sc.get("run_dir") or base / sc["name"])
        if "over" in sc:
            make_run_dir(d, sc["over"])
            if sc.get("plan_edit"):
                sc["plan_edit"](d)
        specs.append({"name": sc["name"], "run_dir": str(d), "probe": sc.get("probe"), "env": sc.get("env", {})})
    out = base / "results.json"
    spec = base / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "scenarios": specs}))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(HERE / "driver.py"), str(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    (base / "driver.log").write_text(proc.stdout + proc.stderr)
    results = json.loads(out.read_text()) if out.is_file() else {}
    if proc.returncode != 0 and not keep_going:
        raise AssertionError(f"driver failed (rc {proc.returncode}); log {base / 'driver.log'}:\n"
                             + (proc.stdout + proc.stderr)[-6000:])
    if keep_going:
        for s in specs:
            results.setdefault(s["name"], {"error": f"not run (launch rc {proc.returncode}; log {base / 'driver.log'})"})
    for name, res in results.items():
        res["run_dir"] = str(base / name) if (base / name).exists() else next(
            s["run_dir"] for s in specs if s["name"] == name)
    return results


def set_defer(defer: bool):
    """Force the plan's FSDP2 gradient-sync deferral (the planner picks it by cost)."""
    def edit(d: Path):
        edit_plan(d, lambda p: dataclasses.replace(p, chosen=dataclasses.replace(p.chosen, fsdp_defer_grad_sync=defer)))
    return edit


FP32 = {"train": {"precision": "fp32", "steps": STEPS}}


def _s(strategy: str, **train) -> dict:
    return {"train": {"strategy": strategy, "precision": "fp32", "steps": STEPS, **train}}


@pytest.fixture(scope="session")
def torch_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("rt_torch")
    sc = [
        {"name": "ddp", "over": _s("ddp"), "probe": "ddp_comm"},
        {"name": "ddp_no_nosync", "over": _s("ddp"), "probe": "ddp_comm_no_nosync"},
        {"name": "ddp_big_batch", "over": _s("ddp", micro_batch=4)},
        {"name": "fsdp_full_shard", "over": _s("fsdp_full_shard"), "probe": "fsdp_rs", "plan_edit": set_defer(False)},
        {"name": "fsdp_defer", "over": _s("fsdp_full_shard"), "probe": "fsdp_rs", "plan_edit": set_defer(True)},
        {"name": "fsdp_shard_grad_op", "over": _s("fsdp_shard_grad_op")},
        {"name": "ddp_ckpt_full", "over": _s("ddp", grad_ckpt="full"), "probe": "ckpt_layers"},
        {"name": "ddp_ckpt_selective", "over": _s("ddp", grad_ckpt="selective", selective_every=2),
         "probe": "ckpt_layers"},
        {"name": "fsdp_ckpt_full", "over": _s("fsdp_full_shard", grad_ckpt="full"), "probe": "ckpt_layers"},
        {"name": "ddp_adamw8bit", "over": _s("ddp", optimizer="adamw8bit")},
        {"name": "ddp_adafactor", "over": _s("ddp", optimizer="adafactor", lr=1e-2)},
        {"name": "ddp_lion", "over": _s("ddp", optimizer="lion", lr=3e-4)},
        {"name": "ddp_sgd", "over": _s("ddp", optimizer="sgd", lr=0.5)},
        {"name": "fsdp_adafactor", "over": _s("fsdp_full_shard", optimizer="adafactor", lr=1e-2)},
        # issue 19: FSDP2 + CPUOffloadPolicy (torch AdamW on the host shards), accumulating on the host
        {"name": "fsdp_offload", "over": _s("fsdp_offload")},
    ]
    for s in ("ddp", "fsdp_full_shard", "fsdp_shard_grad_op", "fsdp_offload"):
        sc.append({"name": f"bf16_{s}", "over": {"train": {"strategy": s, "precision": "bf16", "steps": 2}}})
    return run_driver(base, sc)


DS_STRATEGIES = ("zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "zero3_opt_offload")


@pytest.fixture(scope="session")
def ds_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("rt_ds")
    sc = [{"name": s, "over": _s(s)} for s in DS_STRATEGIES]
    sc += [{"name": f"bf16_{s}", "over": {"train": {"strategy": s, "precision": "bf16", "steps": 2}}}
           for s in DS_STRATEGIES]
    sc += [{"name": "bf16_zero2_offload_accum1",
            "over": {"train": {"strategy": "zero2_offload", "precision": "bf16", "steps": 2, "micro_batch": 4}}},
           {"name": "bf16_zero2_adamw8bit",
            "over": {"train": {"strategy": "zero2", "precision": "bf16", "steps": 2, "optimizer": "adamw8bit"}}},
           {"name": "bf16_zero3_lora",
            "over": {"train": {"strategy": "zero3", "precision": "bf16", "steps": 2, "method": "lora"}}}]
    return run_driver(base, sc)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved tiny Llama (seeded random init) + the bundled tokenizer: the from_pretrained path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from shardtrain.runtime.data import load_tokenizer
    d = tmp_path_factory.mktemp("tiny_ckpt")
    cfg = AutoConfig.from_pretrained(HERE.parents[1] / "configs" / "models" / "tiny-llama.json")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    load_tokenizer(None, None).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def lora_results(tmp_path_factory, tiny_checkpoint):
    base = tmp_path_factory.mktemp("rt_lora")
    ck = str(tiny_checkpoint)
    sc = []
    for s in ("ddp", "fsdp_full_shard", "zero3"):
        sc.append({"name": f"lora_{s}", "over": {"model": {"name": ck}, "run": {"eval_every": STEPS},
                                                  "train": {"strategy": s, "method": "lora", "precision": "fp32",
                                                            "lr": 1e-2, "steps": STEPS, "grad_ckpt": "full"}}})
    sc.append({"name": "qlora_ddp", "probe": "qlora",
               "over": {"model": {"name": ck}, "run": {"eval_every": 1},
                        "train": {"strategy": "ddp", "method": "qlora", "precision": "bf16", "lr": 1e-2,
                                  "steps": STEPS, "grad_ckpt": "full"}}})
    sc.append({"name": "qlora_zero2", "over": {"model": {"name": ck}, "run": {"eval_every": 2},
                                               "train": {"strategy": "zero2", "method": "qlora", "precision": "bf16",
                                                         "lr": 1e-2, "steps": STEPS}}})
    # issue 19: QLoRA on FSDP2 + CPU offload (the Answer.AI 70B-on-2x24GB setup, tiny here)
    sc.append({"name": "qlora_fsdp_offload", "over": {"model": {"name": ck}, "run": {"eval_every": 2},
                                                      "train": {"strategy": "fsdp_offload", "method": "qlora",
                                                                "precision": "bf16", "lr": 1e-2, "steps": STEPS}}})
    sc.append({"name": "bf16_lora_ddp", "over": {"model": {"name": ck},
                                                 "train": {"strategy": "ddp", "method": "lora", "precision": "bf16",
                                                           "steps": 2}}})
    return run_driver(base, sc)


RESUME_ENGINES = ("ddp", "fsdp_full_shard", "zero2", "zero3", "lora_zero3", "lora_fsdp_full_shard")
#: Issue 13: each stop signal, one per engine (the worker treats them alike; each must end in a checkpoint).
RESUME_SIGNAL = {"ddp": "USR2", "fsdp_full_shard": "TERM", "zero2": "INT", "zero3": "USR1"}


@pytest.fixture(scope="session")
def resume_results(tmp_path_factory, tiny_checkpoint):
    """Per engine: a run pre-empted after step 3 (simulated SIGUSR2), the same run dir again
    (resume), and an uninterrupted reference run."""
    base = tmp_path_factory.mktemp("rt_resume")
    sc = []
    for s in RESUME_ENGINES:
        over = {"train": {"strategy": s, "precision": "fp32", "steps": 6}, "run": {"eval_every": 2}}
        if s.startswith("lora_"):  # LoRA on a saved tiny checkpoint: only the adapter is checkpointed
            over = {"model": {"name": str(tiny_checkpoint)}, "run": {"eval_every": 2},
                    "train": {"strategy": s[5:], "method": "lora", "precision": "fp32", "lr": 1e-2, "steps": 6}}
        d = base / f"resume_{s}"
        sc.append({"name": f"pre_{s}", "run_dir": str(d), "over": over,
                   "env": {"SHARDTRAIN_TEST_SIGNAL_AT_STEP": f"3:{RESUME_SIGNAL.get(s, 'USR2')}"}})
        sc.append({"name": f"post_{s}", "run_dir": str(d)})
        sc.append({"name": f"ref_{s}", "over": over})
    return run_driver(base, sc)
