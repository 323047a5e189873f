"""Issue 22 (6): LoRA merge on export. `run.export: merged | both` writes full weights with the adapter
merged in, loadable with `AutoModelForCausalLM.from_pretrained`, that compute what the trained base +
adapter computes; under DDP (both: adapter in final/, merged in final/merged/), FSDP2 and ZeRO-3
(merged: final/ is the merged model). QLoRA is refused at config load (merging into NF4 rounds)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import STEPS, run_driver

pytestmark = pytest.mark.multiproc

SCENARIOS = {"merge_ddp_both": ("ddp", "both"), "merge_fsdp_merged": ("fsdp_full_shard", "merged"),
             "merge_zero3_merged": ("zero3", "merged")}


@pytest.fixture(scope="module")
def merge_results(tmp_path_factory, tiny_checkpoint):
    base = tmp_path_factory.mktemp("rt_merge")
    sc = [{"name": name, "over": {"model": {"name": str(tiny_checkpoint)},
                                  "run": {"eval_every": STEPS, "export": export},
                                  "train": {"strategy": strategy, "method": "lora", "precision": "fp32", "lr": 1e-2,
                                            "steps": STEPS, "grad_ckpt": "none"}}}
          for name, (strategy, export) in SCENARIOS.items()]
    return run_driver(base, sc)


def _eval_batches(run_dir: Path):
    from shardtrain.runtime.build import read_run_dir
    from shardtrain.runtime.data import build_datasets, eval_indices, load_tokenizer
    cfg, plan = read_run_dir(run_dir)
    tok = load_tokenizer(None, None)
    _, ev = build_datasets(tok, train_path=plan.runtime.data_train, eval_path=plan.runtime.data_eval,
                           eval_fraction=cfg.data.eval_fraction, fmt=cfg.data.format, packing=cfg.data.packing,
                           seq_len=plan.train.seq_len)
    m, W = plan.chosen.micro_batch_size, plan.chosen.world_size
    return [ev.collate(ix) for r in range(W) for ix in eval_indices(len(ev), cfg.run.eval_batches, m, W, r)]


def _eval_loss(model, batches) -> float:
    from shardtrain.runtime.loss import ce_sum
    tot = n = 0.0
    with torch.no_grad():
        for b in batches:
            b = dict(b)
            labels = b.pop("labels")
            # use_cache=False: with a cache transformers skips its packed-sequence detection and lets
            # packed documents attend across their boundary (masking_utils _preprocess_mask_arguments);
            # the worker keeps them apart (runtime/packed_attention.py).
            tot += float(ce_sum(model(**b, use_cache=False).logits, labels))
            n += float((labels[:, 1:] != -100).sum())
    return tot / n


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_merged_export_loads_and_matches_the_trained_model(merge_results, name):
    from transformers import AutoModelForCausalLM
    res = merge_results[name]
    assert "error" not in res, res.get("traceback", res)
    run_dir = Path(res["run_dir"])
    export = SCENARIOS[name][1]
    merged_dir = run_dir / "final" / ("merged" if export == "both" else "")
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "config.json").is_file()
    assert (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    assert (run_dir / "final" / "adapter_config.json").is_file() == (export == "both")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    # the merged weights compute what the worker evaluated (base + adapter) at the last step
    worker_eval = res["evals"][-1]["eval_loss"]
    assert _eval_loss(merged, _eval_batches(run_dir)) == pytest.approx(worker_eval, rel=1e-4)


def test_merged_equals_peft_merge_of_the_adapter(merge_results, tiny_checkpoint):
    """final/merged/ (both) is what peft's own merge_and_unload gives for base + final/'s adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    final = Path(merge_results["merge_ddp_both"]["run_dir"]) / "final"
    base = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, str(final)).merge_and_unload().state_dict()
    got = load_file(str(final / "merged" / "model.safetensors"))
    assert set(got) <= set(ref) and len(got) >= len(ref) - 1  # tied lm_head may be stored once
    for k, v in got.items():
        torch.testing.assert_close(v, ref[k], rtol=1e-5, atol=1e-6)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_checkpoint), dtype=torch.float32).state_dict()
    assert any(not torch.equal(got[k], base[k]) for k in got if "q_proj" in k), "the adapter was merged in"
    assert json.loads((final / "merged" / "config.json").read_text())["model_type"] == "llama"


def test_qlora_merged_is_refused_with_the_reason():
    from shardtrain.config.schema import ConfigError, parse_run_config
    with pytest.raises(ConfigError) as e:
        parse_run_config({"model": {"name": "tiny-llama"}, "train": {"method": "qlora"}, "run": {"export": "merged"}})
    msg = str(e.value)
    assert msg.startswith("run.export: merged") and "4 bits" in msg and "run.export: adapter" in msg
    cfg = parse_run_config({"model": {"name": "tiny-llama"}, "train": {"method": "lora"}, "run": {"export": "both"}})
    assert cfg.run.export.value == "both"
