"""Hand-computed checks of the model-state memory model (shardtrain/compiler/memory.py,
optimizer_states.py), and three small real-library checks: LoRA trainable counts against peft,
QLoRA bytes against a real bitsandbytes 4-bit model, 8-bit AdamW state against a real optimizer.

The engine-level truth test (real DDP / FSDP2 / DeepSpeed on 2 gloo ranks) is
tests/test_truth_engines.py.
"""
from __future__ import annotations

import math

import pytest

from shardtrain.compiler.inventory import tensor_inventory, trainable_params
from shardtrain.compiler.memory import (QLORA_BYTES_PER_PARAM, QLORA_QUANT_STATE_BYTES_PER_TENSOR,
                                        ZeroBuckets, frozen_weight_bytes, model_state_bytes,
                                        zero3_persistent_params)
from shardtrain.compiler.optimizer_states import (BNB_BLOCK_SIZE, BNB_MIN_8BIT_SIZE, BNB_QMAP_BYTES,
                                                  state_bytes)
from shardtrain.compiler.specs import HardwareSpec, Method, Optimizer, Precision, Strategy
from shardtrain.config.presets import load_model_config, load_model_spec

TINY = load_model_spec("tiny-llama")
L8B = load_model_spec("llama-3.1-8b")


def _hw(n: int) -> HardwareSpec:
    return HardwareSpec(nodes=1, gpus_per_node=n)


def _ms(model, strategy, n, *, method=Method.FULL, precision=Precision.BF16, optimizer=Optimizer.ADAMW,
        rank=16, targets="all-linear"):
    groups = tensor_inventory(model, method, rank, targets)
    return model_state_bytes(model, groups, strategy, _hw(n), method=method, precision=precision,
                             optimizer=optimizer), groups


def _sum(ms) -> int:
    return ms.params + ms.grads + ms.master_params + ms.optimizer_states


# ------------------------------------------------------------------ 16 B/param and the ZeRO formulas

@pytest.mark.parametrize("model", [TINY, L8B], ids=["tiny", "8b"])
@pytest.mark.parametrize("n", [1, 2, 8])
def test_ddp_is_16_bytes_per_param(model, n):
    """Mixed-precision Adam, ZeRO paper K=12: 2+2+12 = 16 B/param. The DDP runtime keeps fp32
    params (4) + fp32 grads (4) + m, v (8) and no separate master: still 16 B/param."""
    ms, _ = _ms(model, Strategy.DDP, n)
    psi = model.num_params
    assert (ms.params, ms.grads, ms.master_params, ms.optimizer_states) == (4 * psi, 4 * psi, 0, 8 * psi)
    assert _sum(ms) == 16 * psi


def test_fp32_and_bf16_ddp_hold_the_same_model_state():
    a, _ = _ms(TINY, Strategy.DDP, 2, precision=Precision.FP32)
    b, _ = _ms(TINY, Strategy.DDP, 2, precision=Precision.BF16)
    assert _sum(a) == _sum(b) == 16 * TINY.num_params


def _persist(model) -> int:
    """ZeRO-3 params below stage3_param_persistence_threshold (10·h) stay gathered on every rank."""
    return zero3_persistent_params(tensor_inventory(model, Method.FULL), ZeroBuckets.for_model(model))


# (strategy, paper formula of the model-state sum, DeepSpeed's extra over the paper) in units of Ψ
# The extra is the fp32 gradient partition DeepSpeed builds at step time (4Ψ/N:
# stage_1_and_2.py step(): `single_grad_partition = flat_grad_partition.to(fp32)`;
# stage3.py _prepare_fp32_grad_for_sub_group), which the paper's K=12 does not count.
ZERO_TABLE = [
    (Strategy.ZERO1, lambda psi, n: 4 * psi + 12 * psi / n, lambda psi, n: 4 * psi / n),
    (Strategy.ZERO2, lambda psi, n: 2 * psi + 14 * psi / n, lambda psi, n: 4 * psi / n),
    (Strategy.ZERO3, lambda psi, n: 16 * psi / n, lambda psi, n: 4 * psi / n),
]


@pytest.mark.parametrize("strategy,paper,extra", ZERO_TABLE, ids=lambda x: getattr(x, "value", ""))
@pytest.mark.parametrize("n", [2, 8, 64])
@pytest.mark.parametrize("model", [TINY, L8B], ids=["tiny", "8b"])
def test_zero_formulas(strategy, paper, extra, n, model):
    ms, _ = _ms(model, strategy, n)
    psi = model.num_params
    expected = paper(psi, n) + extra(psi, n)
    if strategy is Strategy.ZERO3:
        expected += 2 * _persist(model) * (1 - 1 / n)   # persistent params: full 16-bit copy
    # ceil() per term and per-partition rounding: a few bytes
    assert _sum(ms) == pytest.approx(expected, abs=8)


@pytest.mark.parametrize("n", [2, 8])
def test_zero_terms_split(n):
    psi = L8B.num_params
    z1, _ = _ms(L8B, Strategy.ZERO1, n)
    z2, _ = _ms(L8B, Strategy.ZERO2, n)
    z3, _ = _ms(L8B, Strategy.ZERO3, n)
    for ms in (z1, z2, z3):
        assert ms.master_params == math.ceil(4 * psi / n)
        assert ms.optimizer_states == math.ceil(8 * psi / n)
    assert z1.params == z2.params == 2 * psi
    assert z1.grads == 2 * psi + math.ceil(4 * psi / n)    # full 16-bit grads exist during backward
    assert z2.grads == math.ceil(2 * psi / n) + math.ceil(4 * psi / n)
    assert z3.grads == math.ceil(2 * psi / n) + math.ceil(4 * psi / n)


def test_zero_offload_moves_master_states_to_host():
    psi = TINY.num_params
    for s in (Strategy.ZERO2_OFFLOAD, Strategy.ZERO3_OFFLOAD):
        ms, _ = _ms(TINY, s, 2)
        assert ms.master_params == ms.optimizer_states == ms.grads == 0
        # master 4Ψ/N + m,v 8Ψ/N + fp32 grads 4Ψ/N + 16-bit staging copy 2Ψ/N on the host
        extra = 0
        if s is Strategy.ZERO3_OFFLOAD:
            extra = 2 * math.ceil(psi / 2)    # the 16-bit param partition itself is offloaded
        assert ms.cpu_bytes == pytest.approx(18 * psi / 2 + extra, abs=64 + 2 * _largest(TINY))


def _largest(model) -> int:
    return max(g.numel for g in tensor_inventory(model, Method.FULL))


def test_fsdp_full_shard_is_16_over_n():
    for n in (2, 8):
        ms, _ = _ms(L8B, Strategy.FSDP_FULL_SHARD, n)
        assert _sum(ms) == pytest.approx(16 * L8B.num_params / n, rel=1e-6)


def test_lora_only_trainable_params_get_state():
    ms, groups = _ms(L8B, Strategy.DDP, 8, method=Method.LORA, rank=16)
    t = trainable_params(groups)
    assert t < 0.01 * L8B.num_params
    assert ms.grads == 4 * t and ms.optimizer_states == 8 * t and ms.master_params == 0
    assert ms.params == 4 * t + 2 * L8B.num_params       # frozen base in bf16


# ------------------------------------------------------------------ 8-bit optimizer state (hand)

@pytest.mark.parametrize("numel,expected", [
    (128, 8 * 128),                                   # < min_8bit_size: two fp32 states
    (4095, 8 * 4095),
    (4096, 2 * 4096 + 2 * 4 * 16 + 2 * BNB_QMAP_BYTES),   # 16 blocks of 256
    (4097, 2 * 4097 + 2 * 4 * 17 + 2 * BNB_QMAP_BYTES),   # a partial 17th block
])
def test_adamw8bit_hand_computed(numel, expected):
    from shardtrain.compiler.inventory import TensorGroup
    g = (TensorGroup("w", (numel,), 1, True),)
    assert state_bytes(Optimizer.ADAMW8BIT, g) == expected
    assert BNB_BLOCK_SIZE == 256 and BNB_MIN_8BIT_SIZE == 4096


# ------------------------------------------------------------------ real libraries

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _tiny_model(name: str = "tiny-llama"):
    cfg, _ = load_model_config(name)
    cfg = {k: v for k, v in cfg.items() if k not in ("torch_dtype", "dtype")}
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))


@pytest.mark.parametrize("targets,rank", [
    ("all-linear", 8), ("all-linear", 16), (("q_proj", "v_proj"), 4),
    (("gate_proj", "up_proj", "down_proj"), 32), (("k_proj", "o_proj"), 2),
])
def test_lora_trainable_count_matches_peft(targets, rank):
    peft = pytest.importorskip("peft")
    model = _tiny_model()
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets if isinstance(targets, str)
                          else list(targets), lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(model, cfg)
    trainable, total = pm.get_nb_trainable_parameters()
    groups = tensor_inventory(TINY, Method.LORA, rank, targets)
    assert trainable_params(groups) == trainable
    assert sum(g.total for g in groups) == total


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes():
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def test_qlora_bytes_match_real_bitsandbytes(tmp_path):
    """NF4 + double quantisation on the quantized Linear weights: 0.5 + 1/64 + 4/(64·256) B/param
    (QLORA_BYTES_PER_PARAM ≈ 0.516) plus bitsandbytes' per-tensor QuantState metadata; embeddings,
    norms and lm_head stay bf16. Compared with a real 4-bit load of a saved tiny Llama."""
    bnb = pytest.importorskip("bitsandbytes")
    _tiny_model().save_pretrained(tmp_path)
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.bfloat16)
    q = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg,
                                                          dtype=torch.bfloat16)
    quant, other = [], []
    n_quant = 0
    for mod in q.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w, qs = mod.weight, mod.weight.quant_state
            n_quant += qs.shape.numel()
            quant += [w, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    qids = {id(t) for t in quant}
    other = [p for p in q.parameters() if id(p) not in qids]
    real_quant = _storage_bytes(quant)
    real_other = _storage_bytes(other)
    groups = tensor_inventory(TINY, Method.QLORA, 8, "all-linear")
    frozen = tuple(g for g in groups if not g.trainable)
    quantizable = [g for g in frozen if g.quantizable]
    assert sum(g.total for g in quantizable) == n_quant
    payload = sum(math.ceil(g.total * QLORA_BYTES_PER_PARAM) for g in quantizable)
    meta = sum(g.count for g in quantizable) * QLORA_QUANT_STATE_BYTES_PER_TENSOR
    assert payload + meta == pytest.approx(real_quant, rel=1e-3)
    assert real_other == 2 * sum(g.total for g in frozen if not g.quantizable)
    assert frozen_weight_bytes(groups, Method.QLORA, Precision.BF16) == pytest.approx(
        real_quant + real_other, rel=1e-3)
    # the per-param figure the architecture notes quote, on the payload alone
    assert QLORA_BYTES_PER_PARAM == pytest.approx(0.516, abs=5e-4)


LARGE8 = {  # tensors above, below and straddling min_8bit_size, partial 256-blocks
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 96,
    "intermediate_size": 300, "num_attention_heads": 4, "num_key_value_heads": 1,
    "num_hidden_layers": 2, "vocab_size": 3000, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
}


@pytest.mark.parametrize("which", ["tiny-llama", "large8"])
def test_adamw8bit_state_matches_real_bitsandbytes(which, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    import json
    name = which
    if which == "large8":
        path = tmp_path / "config.json"
        path.write_text(json.dumps(LARGE8))
        name = str(path)
    spec = load_model_spec(name)
    model = _tiny_model(name)
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    ids = torch.randint(0, spec.vocab_size, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    tensors = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    real = _storage_bytes(tensors)
    groups = tensor_inventory(spec, Method.FULL)
    assert state_bytes(Optimizer.ADAMW8BIT, groups) == real
