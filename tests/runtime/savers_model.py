"""Test helper for the savers' in-process tests (test_tiled_mlp, test_ckpt_offload, test_op_sac): a tiny
HF Llama (2 layers, hidden 64) built, checkpointed, LoRA-adapted and tiled by the runtime's own
functions (runtime/modeling.py enable_checkpointing, runtime/tiled_mlp.py), one forward/backward."""
from __future__ import annotations

import copy
import functools

import torch

from shardtrain.compiler.specs import GradCkpt

LAYER = "LlamaDecoderLayer"


@functools.lru_cache(maxsize=None)
def base_model(seq_vocab: int = 256, intermediate: int = 160):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=seq_vocab, use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def batch(b: int = 2, s: int = 37, vocab: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, vocab, (b, s), generator=g)


def build(*, ckpt: GradCkpt = GradCkpt.NONE, tiles: int = 1, lora_dropout: float | None = None,
          ckpt_offload: bool = False, naive_tiles: bool = False, ds_flags: bool = False):
    """A fresh copy of the tiny model with the savers on; returns (model, stash)."""
    from shardtrain.runtime.modeling import decoder_layers, enable_checkpointing
    from shardtrain.runtime.tiled_mlp import install_tiled_mlp, tile_slices
    m = copy.deepcopy(base_model())
    m.train()
    stash = enable_checkpointing(m, ckpt, 1, ckpt_offload=ckpt_offload, device_type="cpu")
    if lora_dropout is not None:
        from peft import LoraConfig, get_peft_model
        torch.manual_seed(5)
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():  # lora_B starts at zero: give it values so every adapter gets a gradient
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    layers = decoder_layers(m, LAYER)
    if naive_tiles:  # the reference for dropout: the same tiles, plain autograd (no recompute)
        import types
        for layer in layers:
            orig = type(layer.mlp).forward
            layer.mlp.forward = types.MethodType(
                lambda self, x, orig=orig: torch.cat([orig(self, x[..., sl, :])
                                                      for sl in tile_slices(x.shape[-2], tiles)], dim=-2), layer.mlp)
    else:
        install_tiled_mlp(layers, tiles, ds_flags=ds_flags)
    return m, stash


def step(model, ids: torch.Tensor | None = None, autocast: torch.dtype | None = None):
    """One forward + backward with fixed RNG; returns (loss, {name: grad})."""
    ids = batch() if ids is None else ids
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                  if p.grad is not None}


def tracked_peak(model, ids: torch.Tensor) -> int:
    """Peak bytes of one forward + backward under PyTorch's MemTracker (what run.memory_trace uses)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    mt = MemTracker()
    mt.track_external(model)
    with mt:
        model(input_ids=ids, labels=ids).loss.backward()
    return mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def worst_rel(got: dict, want: dict) -> float:
    """max over tensors of max|got - want| / max|want| (and the same parameters have gradients)."""
    assert set(got) == set(want), set(got) ^ set(want)
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-30)) for k in want)
