"""Build the model on each rank: source → dtype → (NF4) → checkpointing (+ offload) → LoRA → tiled MLP,
without N copies.

Loading (memory-efficient): rank 0 materialises the full model on the host (random init from the
config with the run seed, or `from_pretrained` of a local checkpoint); the other ranks build it on the
meta device. The engine then fills them: DDP/DeepSpeed broadcast every tensor from rank 0 into
`to_empty` storage (`broadcast_from_rank0`), FSDP2 shards the meta model and loads rank 0's state
dict with `set_model_state_dict(..., broadcast_from_rank0=True)`. ZeRO-3 loading a checkpoint (or a
random model ≥ ZERO_INIT_MIN_PARAMS) builds under `deepspeed.zero.Init`, partitioned at construction
(small random models are not: zero.Init draws different weights for the same seed).

Dtype policy (compiler/memory.py): DDP/FSDP2 full fine-tuning keeps params fp32 (autocast /
MixedPrecisionPolicy compute in 16-bit); DeepSpeed builds in the 16-bit compute dtype (it keeps the
fp32 master copy); LoRA's frozen base is in the compute dtype and peft upcasts adapters to fp32;
pure bf16 (Precision.BF16_PURE) builds everything, adapters included, in bf16 and runs no autocast;
QLoRA stores decoder-layer Linear weights in NF4 (double quantisation) and the rest in 16-bit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from shardtrain.compiler.plan import ModelRef
from shardtrain.compiler.specs import Engine, GradCkpt, Method, Precision

log = logging.getLogger("shardtrain.worker")

ZERO_INIT_MIN_PARAMS = 10**9
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def compute_dtype(precision: Precision) -> torch.dtype:
    return {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16, Precision.FP32: torch.float32,
            Precision.BF16_PURE: torch.bfloat16}[precision]


@dataclass
class ModelSource:
    config: object              # transformers PretrainedConfig
    weights_dir: str | None     # checkpoint directory to load weights from (None: random init)
    model_dir: str | None       # checkpoint directory (tokenizer lookup), if any


def model_source(ref: ModelRef) -> ModelSource:
    """The model the plan's runtime facts name (emit/runtime.py resolved it when the run dir was written):
    a checkpoint directory (its config.json; its weights unless model.init is random) or config.json
    contents (a preset, a config.json path, a `--params` shape: random init)."""
    from transformers import AutoConfig
    model_dir = ref.checkpoint_dir
    if model_dir is not None:
        config = AutoConfig.from_pretrained(model_dir)
    else:
        raw = dict(ref.hf_config)
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    has_weights = model_dir is not None and any((Path(model_dir) / f).is_file() for f in WEIGHT_FILES)
    if ref.init == "pretrained" and not has_weights:
        raise FileNotFoundError(f"model.init: pretrained, but {ref.name!r} is not a checkpoint directory "
                                f"with weights ({', '.join(WEIGHT_FILES)})")
    weights = model_dir if has_weights and ref.init != "random" else None
    config.use_cache = False
    return ModelSource(config=config, weights_dir=weights, model_dir=model_dir)


def build_dtype(engine: Engine, method: Method, precision: Precision) -> torch.dtype:
    """The dtype the model is built in: fp32 for DDP/FSDP2 full fine-tuning under mixed precision (the fp32
    params are the master), else the compute dtype — pure bf16 builds everything in bf16 (no master)."""
    if method is Method.FULL and engine is not Engine.DEEPSPEED and precision.autocast:
        return torch.float32
    return compute_dtype(precision)


def _attn(attention: str) -> str:
    return {"sdpa": "sdpa", "flash": "flash_attention_2", "eager": "eager"}[attention]


def build_base(src: ModelSource, dtype: torch.dtype, *, seed: int, attention: str, meta: bool,
               zero_init_config: dict | None = None) -> nn.Module:
    """The bare HF causal LM: real on this rank (`meta=False`) or on the meta device."""
    from transformers import AutoModelForCausalLM
    attn = _attn(attention)
    if zero_init_config is not None:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig
        from shardtrain.runtime.dist import init_deepspeed_comm
        init_deepspeed_comm()
        hf_ds = HfDeepSpeedConfig(zero_init_config)  # noqa: F841  (kept alive for from_pretrained)
        if src.weights_dir:
            return AutoModelForCausalLM.from_pretrained(src.weights_dir, dtype=dtype, attn_implementation=attn)
        torch.manual_seed(seed)
        with deepspeed.zero.Init(config_dict_or_path=zero_init_config, dtype=dtype):
            return AutoModelForCausalLM.from_config(src.config, dtype=dtype, attn_implementation=attn)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(src.config, dtype=dtype, attn_implementation=attn)
    if src.weights_dir:
        return AutoModelForCausalLM.from_pretrained(src.weights_dir, dtype=dtype, attn_implementation=attn)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(src.config, dtype=dtype, attn_implementation=attn)


def broadcast_from_rank0(model: nn.Module, device: torch.device) -> None:
    """Non-zero ranks: allocate meta tensors on `device`; then every param/buffer ← rank 0.
    Non-persistent buffers (rotary inv_freq) are covered too; tied weights are re-tied."""
    is_meta = any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    if is_meta:
        model.to_empty(device=device)
        if hasattr(model, "tie_weights"):
            model.tie_weights()
    elif device.type != "cpu":
        model.to(device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        dist.broadcast(t.data, src=0)


def enable_checkpointing(model: nn.Module, mode: GradCkpt, every: int, *, ckpt_offload: bool = False,
                         device_type: str = "cpu"):
    """Full: every decoder layer; selective: every k-th (layers 0, k, 2k, …); op: every layer with
    torchtitan's op-level policy as the checkpoint's context_fn (runtime/sac.py); all non-reentrant.
    `ckpt_offload`: the checkpointed layers' inputs in host memory (runtime/ckpt_offload.py); returns
    its stash (None without it)."""
    if mode in (GradCkpt.NONE, GradCkpt.AUTO):
        return None
    from shardtrain.runtime.sac import checkpoint_kwargs
    k = every if mode is GradCkpt.SELECTIVE else 1
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs(mode is GradCkpt.OP),
                                          every_n_layers=k)
    if not ckpt_offload:
        return None
    from shardtrain.runtime.ckpt_offload import install_ckpt_offload
    return install_ckpt_offload(model, device_type)


def checkpointed_layers(model: nn.Module) -> list[int]:
    from transformers.modeling_layers import GradientCheckpointingLayer
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return [i for i, m in enumerate(layers) if m.gradient_checkpointing]


def quantize_4bit(model: nn.Module, *, compute: torch.dtype, storage: torch.dtype, device: torch.device,
                  layer_class: str) -> int:
    """Replace every nn.Linear inside the decoder layers by an NF4 bnb Linear4bit (double quant,
    `quant_storage=storage`), quantised on `device`. Embeddings, norms and lm_head stay 16-bit.
    `support_avx512bf16_for_cpu = False`: otherwise an eval forward repacks the weights into an
    inference-only layout and LoRA gets no gradient afterwards (shared/notes/cpu-distributed.md)."""
    import bitsandbytes as bnb
    n = 0
    for layer in [m for m in model.modules() if type(m).__name__ == layer_class]:
        for name, lin in list(layer.named_modules()):
            if type(lin) is not nn.Linear:
                continue
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  compute_dtype=compute, compress_statistics=True, quant_type="nf4",
                                  quant_storage=storage, device="meta")
            q.weight = bnb.nn.Params4bit(lin.weight.data.to(compute), requires_grad=False,
                                         compress_statistics=True, quant_type="nf4",
                                         quant_storage=storage, module=q).to(device)
            if lin.bias is not None:
                q.bias = nn.Parameter(lin.bias.data.to(compute), requires_grad=False)
            q.support_avx512bf16_for_cpu = False
            parent, _, leaf = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, leaf, q)
            n += 1
    return n


def apply_lora(model: nn.Module, *, rank: int, alpha: int, dropout: float, targets: tuple[str, ...], seed: int,
               adapter_dtype: torch.dtype | None = None):
    """peft LoRA; the adapters are fp32 (peft's autocast_adapter_dtype), or `adapter_dtype` (pure bf16: the
    adapters in bf16 too, as torchtune / Answer.AI's `--precision bf16` train them)."""
    from peft import LoraConfig, get_peft_model
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                     task_type="CAUSAL_LM", bias="none")
    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(model, cfg, autocast_adapter_dtype=adapter_dtype is None)
    if adapter_dtype is not None:
        for p in peft_model.parameters():
            if p.requires_grad:
                p.data = p.data.to(adapter_dtype)
    return peft_model


def decoder_layers(model: nn.Module, layer_class: str) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == layer_class
            or type(m).__name__ == "FSDP" + layer_class]


@dataclass
class BuildSpec:
    engine: Engine
    method: Method
    precision: Precision
    grad_ckpt: GradCkpt
    selective_every: int
    attention: str
    seed: int
    lora: dict | None          # rank/alpha/dropout/targets
    layer_class: str
    zero_stage: int = 0
    num_params: int = 0
    qlora_storage: torch.dtype = torch.uint8
    tiled_mlp_tiles: int = 1
    """plan.chosen.tiled_mlp_tiles: each decoder layer's MLP in this many sequence tiles (1: untiled)"""
    ckpt_offload: bool = False
    """plan.chosen.ckpt_offload: checkpointed layer inputs in host memory"""
    device_type: str = "cpu"
    tp: int = 1
    """plan.parallel.tp (the tiled MLP does not run on a tensor-parallel split MLP)"""


def build_model(src: ModelSource, spec: BuildSpec, *, rank: int, world_size: int, device: torch.device,
                ds_config: dict | None = None, materialize: bool = True) -> nn.Module:
    """The model as this rank's engine expects it. `materialize=False` (FSDP2) leaves non-zero ranks on
    meta and returns rank 0's real model; the engine shards and loads it."""
    dtype = build_dtype(spec.engine, spec.method, spec.precision)
    use_zero_init = (spec.engine is Engine.DEEPSPEED and spec.zero_stage == 3 and spec.method is not Method.QLORA
                     and (src.weights_dir is not None
                          or spec.num_params >= ZERO_INIT_MIN_PARAMS))
    if use_zero_init:
        model = build_base(src, dtype, seed=spec.seed, attention=spec.attention, meta=False,
                           zero_init_config=ds_config)
    else:
        meta = rank != 0 and world_size > 1
        model = build_base(src, dtype, seed=spec.seed, attention=spec.attention, meta=meta)
        if spec.method is Method.QLORA or materialize:
            broadcast_from_rank0(model, device)
    if spec.method is Method.QLORA:
        quantize_4bit(model, compute=compute_dtype(spec.precision), storage=spec.qlora_storage,
                      device=device, layer_class=spec.layer_class)
        model.to(device)
    if spec.tiled_mlp_tiles > 1 and spec.tp > 1:
        raise ValueError(f"plan.json: tiled_mlp_tiles {spec.tiled_mlp_tiles} with parallel.tp {spec.tp}: the tiled MLP "
                         "runs on a whole (not tensor-parallel) MLP; set train.tiled_mlp: off or parallel.tp: 1")
    stash = enable_checkpointing(model, spec.grad_ckpt, spec.selective_every, ckpt_offload=spec.ckpt_offload,
                                 device_type=spec.device_type)
    if spec.method is not Method.FULL:
        model = apply_lora(model, seed=spec.seed, **spec.lora,
                           adapter_dtype=torch.bfloat16 if spec.precision is Precision.BF16_PURE else None)
        if spec.method is Method.QLORA and world_size > 1:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        dist.broadcast(p.data, src=0)
    tiled = tile_mlps(model, spec.tiled_mlp_tiles, spec.layer_class, spec.engine)   # after LoRA
    if rank == 0:
        log.info("memory savers: %s", savers_line(spec, len(checkpointed_layers(model)), tiled, stash))
    return model


def tile_mlps(model: nn.Module, tiles: int, layer_class: str, engine: Engine) -> int:
    """plan.chosen.tiled_mlp_tiles on every decoder layer's MLP (runtime/tiled_mlp.py); after LoRA, so the
    tiles run peft's MLP projections. Returns how many layers (0 when tiles < 2)."""
    if tiles < 2:
        return 0
    from shardtrain.runtime.tiled_mlp import install_tiled_mlp
    return install_tiled_mlp(decoder_layers(model, layer_class), tiles, ds_flags=engine is Engine.DEEPSPEED)


def savers_line(spec: BuildSpec, checkpointed: int, tiled: int, stash) -> str:
    """The worker's one line on which savers run (plan.chosen: gradient_checkpointing, tiled_mlp_tiles,
    ckpt_offload); activation offload and the chunked loss are runtime/loss.py's."""
    ck = {GradCkpt.OP: "op-level selective (torchtitan's op policy)", GradCkpt.FULL: "full",
          GradCkpt.SELECTIVE: f"selective, every {spec.selective_every} layers"}.get(spec.grad_ckpt, "off")
    parts = [f"activation checkpointing {ck}" + (f" ({checkpointed} layers)" if checkpointed else "")]
    parts.append(f"tiled MLP {spec.tiled_mlp_tiles} tiles ({tiled} layers)" if tiled else "tiled MLP off")
    if stash is not None:
        parts.append("checkpointed layer inputs in host memory" + (" (pinned)" if stash.pin_memory else ""))
    else:
        parts.append("checkpoint offload off")
    return ", ".join(parts)


def find_embeddings(model: nn.Module, which: str) -> nn.Module | None:
    """The input ("input") or output ("output") embedding module of a wrapped HF model: walks through
    DDP/peft/DeepSpeed wrappers (base_model / model attributes), at most 4 levels."""
    getter = f"get_{which}_embeddings"
    m = model
    for _ in range(4):
        if hasattr(m, getter):
            try:
                found = getattr(m, getter)()
                if found is not None:
                    return found
            except (NotImplementedError, AttributeError):
                pass
        m = getattr(m, "base_model", None) or getattr(m, "model", None)
        if m is None:
            return None
    return None

