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
                                        ZeroBuckets, frozen_weight_bytes, model_state_bytes)
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


# ---- ZeRO: the paper's formulas plus DeepSpeed's documented extras (memory.py docstring)
# tiny-llama, Ψ = 426624, N = 2, P = Ψ/N = 213312 (already a multiple of the 2·N alignment).
# Flat layout (module order): embed 65536 | layer0 147712 | layer1.q_proj 16384 straddles P ...
#  -> rank 0's grads_in_partition holds embed + layer0 + the whole straddling q_proj = 229632 elems.
PSI, P = 426624, 213312
TINY_ZERO = {
    # strategy: (params, grads, master, states, cpu_bytes)
    # ZeRO-1/2: 16-bit module 2Ψ; grads = 2·229632 (16-bit partition buffer) + 4P (fp32 partition
    # at step; larger than the backward phase 2·max(held extra-large grads) at N = 2)
    Strategy.ZERO1: (2 * PSI, 2 * 229632 + 4 * P, 4 * P, 8 * P, 0),
    Strategy.ZERO2: (2 * PSI, 2 * 229632 + 4 * P, 4 * P, 8 * P, 0),
    # ZeRO-3: partitions 2P + the 5 persistent norm vectors (128 <= 10·h) in full: 2·640
    Strategy.ZERO3: (2 * P + 2 * 640, 2 * P + 4 * P, 4 * P, 8 * P, 0),
    # offload: device keeps only the in-flight gradient (largest tensor, 2·65536); host: master 4P +
    # states 8P + fp32 grads 4P + 16-bit staging partition 2P + temp_grad_buffer_for_cpu_offload
    Strategy.ZERO2_OFFLOAD: (2 * PSI, 2 * 65536, 0, 0, 18 * P + 2 * 65536),
    # host: 16-bit param partition 2P + master 4P + states 8P + 16-bit and fp32 grad partitions 6P
    Strategy.ZERO3_OFFLOAD: (2 * 640, 2 * 65536, 0, 0, 20 * P),
}


@pytest.mark.parametrize("strategy", list(TINY_ZERO), ids=str)
def test_zero_tiny_hand_computed(strategy):
    ms, _ = _ms(TINY, strategy, 2)
    assert TINY.num_params == PSI
    assert (ms.params, ms.grads, ms.master_params, ms.optimizer_states, ms.cpu_bytes) == TINY_ZERO[strategy]


def test_zero_tiny_against_paper():
    """Model-state sums = the ZeRO paper's formula + the documented DeepSpeed extras."""
    n = 2
    fp32_grad = 4 * PSI // n                      # fp32 gradient partition built in step()
    straddle = 2 * (229632 - P)                  # whole straddling tensor in grads_in_partition
    z1, _ = _ms(TINY, Strategy.ZERO1, n)
    z2, _ = _ms(TINY, Strategy.ZERO2, n)
    z3, _ = _ms(TINY, Strategy.ZERO3, n)
    # ZeRO-1: the paper counts full 16-bit grads (2Ψ); DeepSpeed reduces them through buckets into
    # a partition buffer, so at N = 2 the sum is *below* 4Ψ + 12Ψ/N + fp32 grads by 2Ψ - 2·229632
    assert _sum(z1) == 4 * PSI + 12 * PSI // n + fp32_grad - (2 * PSI - 2 * 229632)
    assert _sum(z2) == 2 * PSI + 14 * PSI // n + fp32_grad + straddle
    assert _sum(z3) == 16 * PSI // n + fp32_grad + 2 * 640


def _persistent(model) -> int:
    """Elements DeepSpeed marks ds_persist (parameter_offload.py mark_persistent_parameters:
    ds_numel <= stage3_param_persistence_threshold); they stay gathered on every rank."""
    threshold = ZeroBuckets.for_model(model).param_persistence_threshold
    return sum(g.total for g in tensor_inventory(model, Method.FULL) if g.numel <= threshold)


@pytest.mark.parametrize("n", [8, 64, 512])
def test_zero3_formula_8b(n):
    """16Ψ/N + the larger of the fp32 gradient partition (4Ψ/N, step) and the in-flight 16-bit
    gradient of the largest tensor (backward; the 128256 x 4096 embedding) + persistent params."""
    psi = L8B.num_params
    ms, groups = _ms(L8B, Strategy.ZERO3, n)
    largest = max(g.numel for g in groups)
    part = sum(g.count * math.ceil(g.numel / n) for g in groups)
    assert part == pytest.approx(psi / n, abs=len(groups) * 64)
    expected = 2 * part + (2 * part + max(4 * part, 2 * largest)) + 4 * part + 8 * part + 2 * _persistent(L8B)
    assert _sum(ms) == pytest.approx(expected, abs=8)
    if n == 8:
        assert _sum(ms) == pytest.approx(20 * psi / n + 2 * _persistent(L8B), rel=1e-6)


@pytest.mark.parametrize("n", [8, 64])
def test_zero12_formulas_8b(n):
    psi = L8B.num_params
    z1, groups = _ms(L8B, Strategy.ZERO1, n)
    z2, _ = _ms(L8B, Strategy.ZERO2, n)
    largest = max(g.numel for g in groups)
    part = math.ceil(psi / (2 * n)) * 2
    for ms in (z1, z2):
        assert ms.params == 2 * psi
        assert ms.master_params == 4 * part
        assert ms.optimizer_states == pytest.approx(8 * psi / n, abs=8)
    # ZeRO-2 16-bit buffer: at least P, at most P + the whole tensors straddling both slice edges
    lo = 2 * part + max(4 * part, 2 * largest)
    assert lo <= z2.grads <= lo + 2 * 2 * largest
    # ZeRO-1 never needs more than the paper's full 16-bit grads + the fp32 partition + straddlers
    assert z2.grads <= z1.grads <= 2 * psi + 4 * part + 2 * 2 * largest
    if n == 8:  # the embedding sits inside rank 0's slice: the paper's formula + 4Ψ/N + a straddler
        assert _sum(z2) == pytest.approx(2 * psi + 14 * psi / n + 4 * psi / n, rel=0.01)


def test_zero_offload_moves_master_states_to_host():
    psi = L8B.num_params
    for s in (Strategy.ZERO2_OFFLOAD, Strategy.ZERO3_OFFLOAD):
        ms, groups = _ms(L8B, s, 8)
        largest = max(g.numel for g in groups)
        assert ms.master_params == ms.optimizer_states == 0
        assert ms.grads == 2 * largest          # only the in-flight gradient stays on the GPU
        host = 18 * psi / 8 + (2 * largest if s is Strategy.ZERO2_OFFLOAD else 2 * psi / 8)
        assert ms.cpu_bytes == pytest.approx(host, rel=1e-6)


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
    "num_hidden_layers": 2, "vocab_size": 3001, "max_position_embeddings": 256,
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
