"""Training FLOPs per token and MFU (compiler/flops.py, issue 11): a hand count, and PyTorch's own
FLOP counter (torch.utils.flop_counter.FlopCounterMode) on the real HF model, with and without
activation checkpointing."""
from __future__ import annotations

from pathlib import Path

import pytest

from shardtrain.compiler import flops as F
from shardtrain.compiler.activations import checkpointed_layer_count
from shardtrain.compiler.facts import utilisation
from shardtrain.compiler.specs import GradCkpt
from shardtrain.config.presets import load_model_spec

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "models" / "tiny-llama.json")


def test_hand_count_tiny_llama():
    m = load_model_spec(TINY)  # h 128, 2 layers, 4 heads × 32, 2 kv heads, I 256, V 512, untied
    s = 64
    linear = 128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 256        # q, o + k, v (GQA) + gate, up, down
    layer = linear + 2 * 128                                      # + two RMSNorm weights
    n = 2 * layer + 512 * 128                                     # + lm_head (input embedding: a lookup)
    assert n == 360_960
    attn = 4 * 2 * 128 * s                                        # QKᵀ + A·V, forward, per token
    f = F.train_flops_per_token(m, s)
    assert f.model == f.hardware == 6 * n + 3 * attn == 2_362_368
    # + one forward of both layers but their down_proj (256 × 128; checkpoint's early stop)
    full = F.train_flops_per_token(m, s, checkpointed_layers=2)
    assert full.model == f.model and full.hardware == f.model + 2 * 2 * (layer - 256 * 128) + attn == 2_887_680
    half = F.train_flops_per_token(m, s, checkpointed_layers=1)
    assert half.hardware == f.model + (2 * 2 * (layer - 256 * 128) + attn) / 2
    lora = F.train_flops_per_token(m, s, full_finetune=False)     # frozen weights: no weight gradients
    assert lora.model == 4 * n + 3 * attn
    # layers the runtime recomputes: all, or 0, k, 2k, … (selective every 3 of 32: 0, 3, …, 30)
    assert checkpointed_layer_count(GradCkpt.FULL, 32, 2) == 32
    assert checkpointed_layer_count(GradCkpt.SELECTIVE, 32, 3) == len(range(0, 32, 3)) == 11
    assert checkpointed_layer_count(GradCkpt.NONE, 32, 2) == 0
    # MFU: 1e5 tokens/s × 2,362,368 FLOPs = 0.236 TFLOP/s of a 989 TFLOP/s peak
    assert utilisation(f.model, 1e5, 989.0) == pytest.approx(2_362_368 * 1e5 / 989e12)
    assert utilisation(f.model, 1e5, 0.0) == 0.0


@pytest.mark.parametrize("ckpt", [False, True])
def test_matches_torch_flop_counter(ckpt, monkeypatch):
    torch = pytest.importorskip("torch")
    # DeepSpeed's zero.Init replaces torch.nn.functional.linear with its own autograd Function
    # (deepspeed/runtime/zero/partition_parameters.py: zero3_linear_wrap) and an in-process ZeRO-3
    # test earlier in the session can leave it patched; under that Function non-reentrant
    # checkpointing recomputes down_proj too. Count plain torch, as a non-ZeRO-3 run does.
    monkeypatch.setattr(torch.nn.functional, "linear", torch._C._nn.linear)
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM
    m = load_model_spec(TINY)
    b, s = 2, 64
    cfg = AutoConfig.from_pretrained(TINY)
    cfg._attn_implementation = "eager"  # attention as plain matmuls, which the counter sees
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.train()
    if ckpt:  # as the runtime enables it (runtime/modeling.py enable_checkpointing)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False},
                                              every_n_layers=1)
    ids = torch.randint(0, 512, (b, s))
    with FlopCounterMode(display=False) as fc:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    counted = fc.get_total_flops() / (b * s)
    f = F.train_flops_per_token(m, s, checkpointed_layers=2 if ckpt else 0)
    # the counter counts matmuls only; the formula also counts the RMSNorm weights as 2 FLOPs per
    # forward use, as PaLM's "all parameters" does (2 norms of h per layer; final norm left out)
    norms = m.num_layers * 2 * m.hidden_size
    want = (f.hardware if ckpt else f.model) - 6 * norms - (2 * norms if ckpt else 0)
    assert counted == want
