"""LoRA trains, saves and reloads its adapter under DDP, FSDP2 and ZeRO-3 (with non-reentrant
checkpointing); QLoRA (NF4 + double quantisation, on CPU) trains and its LoRA gradients stay
non-zero after every evaluation pass (the avx512_bf16 repacking trap)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.multiproc

LORA = ("lora_ddp", "lora_fsdp_full_shard", "lora_zero3")
QLORA_FSDP_RTOL = 2e-4
"""qlora_fsdp_offload vs qlora_ddp losses: bf16 compute, another reduction order (measured: 1.1e-4 at most over
4 steps; qlora_zero2 differs from qlora_ddp by 8.7e-5; test_qlora_sharded.py uses the same 2e-4)."""


def reloaded_eval_loss(run_dir: Path, ckpt: Path) -> float:
    """Rebuild base + adapter from disk (from_pretrained / PeftModel.from_pretrained) and evaluate
    the same held-out batches the worker evaluated on both ranks."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from shardtrain.runtime.build import read_run_dir
    from shardtrain.runtime.data import build_datasets, eval_indices, load_tokenizer
    from shardtrain.runtime.loss import ce_sum
    cfg, plan = read_run_dir(run_dir)
    tok = load_tokenizer(None, str(run_dir / "final"))
    _, ev = build_datasets(tok, train_path=plan.runtime.data_train, eval_path=plan.runtime.data_eval,
                           eval_fraction=cfg.data.eval_fraction, fmt=cfg.data.format, packing=cfg.data.packing,
                           seq_len=plan.train.seq_len)
    base = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "final")).eval()
    m, W = plan.chosen.micro_batch_size, plan.chosen.world_size
    tot = n = 0.0
    with torch.no_grad():
        for r in range(W):
            for ix in eval_indices(len(ev), cfg.run.eval_batches, m, W, r):
                b = ev.collate(ix)
                labels = b.pop("labels")
                # use_cache=False: with a cache transformers skips its packed-sequence detection and
                # lets packed documents attend across their boundary (masking_utils
                # _preprocess_mask_arguments); the worker keeps them apart (runtime/packed_attention.py).
                tot += float(ce_sum(model(**b, use_cache=False).logits, labels))
                n += float((labels[:, 1:] != -100).sum())
    return tot / n


@pytest.mark.parametrize("name", LORA)
def test_lora_trains_saves_reloads(lora_results, tiny_checkpoint, name):
    res = lora_results[name]
    run_dir = Path(res["run_dir"])
    assert res["losses"][-1] < res["losses"][0]
    final = run_dir / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists(), "only the adapter is exported for LoRA"
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 16
    worker_eval = res["evals"][-1]["eval_loss"]
    assert reloaded_eval_loss(run_dir, tiny_checkpoint) == pytest.approx(worker_eval, rel=1e-5)


def test_lora_same_across_engines(lora_results):
    ref = lora_results["lora_ddp"]["losses"]
    for name in LORA[1:]:
        assert lora_results[name]["losses"] == pytest.approx(ref, rel=1e-5)


def test_lora_trains_only_adapters(lora_results):
    from safetensors.torch import load_file
    sd = load_file(str(Path(lora_results["lora_ddp"]["run_dir"]) / "final" / "adapter_model.safetensors"))
    assert sd and all("lora_" in k for k in sd)
    assert len(sd) == 2 * 7 * 2  # A and B for 7 projections × 2 layers
    assert all(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k), "lora_B must have moved from 0"


def test_qlora_nf4_setup(lora_results):
    probe = lora_results["qlora_ddp"]["probe"]
    assert probe["linear4bit"] == 7 * 2
    assert probe["quant_type"] == ["nf4"] and probe["double_quant"] == [True]
    assert probe["avx512bf16_flags"] == [False]
    assert 0 < probe["trainable"] < 200_000


def test_qlora_grads_survive_eval(lora_results):
    res = lora_results["qlora_ddp"]
    recs = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2, 3, 4]     # an eval pass after every step
    assert all(r["grad_norm"] > 0 for r in train), "LoRA grads vanished after an eval pass"
    assert train[-1]["loss"] < train[0]["loss"]
    assert (Path(res["run_dir"]) / "final" / "adapter_model.safetensors").is_file()


def test_qlora_under_zero2(lora_results):
    res = lora_results["qlora_zero2"]
    assert res["losses"][-1] < res["losses"][0]
    recs = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in recs if r["kind"] == "train")
    assert (Path(res["run_dir"]) / "final" / "adapter_model.safetensors").is_file()


def test_qlora_under_fsdp_offload(lora_results):
    """Issue 19: QLoRA on FSDP2 + CPUOffloadPolicy (Answer.AI's 70B on 2 x 24 GB, tiny here): the 4-bit
    storage (bnb_4bit_quant_storage = bf16) sharded on the host, adapters trained by torch's optimizer there;
    the same data and init as qlora_ddp, so the losses follow it (bf16 compute, another reduction order)."""
    res = lora_results["qlora_fsdp_offload"]
    assert res["losses"][-1] < res["losses"][0]
    recs = [json.loads(x) for x in (Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in recs if r["kind"] == "train")
    assert res["losses"] == pytest.approx(lora_results["qlora_ddp"]["losses"], rel=QLORA_FSDP_RTOL)
    assert (Path(res["run_dir"]) / "final" / "adapter_model.safetensors").is_file()
