"""RunConfig → compiler inputs (ModelSpec, HardwareSpec, TrainSpec).

This is the only place that reads model config files for the compiler (the compiler stays pure).
"""
from __future__ import annotations

from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.model_params import model_spec_from_params
from shardtrain.compiler.specs import HardwareSpec, LoraSpec, ParallelRequest, TrainSpec
from shardtrain.config.coerce import Auto
from shardtrain.config.presets import get_gpu_preset, load_model_spec
from shardtrain.config.schema import ConfigError, RunConfig

DEFAULT_CPU_MEMORY_BYTES = 1024 * 2**30
DEFAULT_NVME_CAPACITY_BYTES = 3_500_000_000_000


def resolve_model(cfg: RunConfig) -> ModelSpec:
    m = cfg.model
    try:
        if m.name is not None:
            return load_model_spec(m.name)
        return model_spec_from_params(m.params, hidden_size=m.hidden, num_layers=m.layers, num_heads=m.heads,
                                      num_kv_heads=m.kv_heads, vocab_size=m.vocab,
                                      intermediate_size=m.intermediate)
    except ValueError as e:
        # name the key once: presets.py's own messages already start with "model: " (issue 22:
        # "model: model: unknown preset")
        key = "model.name" if m.name is not None else "model.params"
        msg = str(e).removeprefix("model: ")
        raise ConfigError(f"{key}: {msg}") from None


def resolve_hardware(cfg: RunConfig) -> HardwareSpec:
    h = cfg.hardware
    try:
        g = get_gpu_preset(h.gpu)
    except ValueError as e:
        raise ConfigError(f"hardware.gpu: {e}") from None
    inter = h.inter_node_bandwidth or g.inter_node_bandwidth_bytes_per_s
    return HardwareSpec(
        nodes=h.nodes, gpus_per_node=h.gpus_per_node, gpu_name=g.name,
        gpu_memory_bytes=h.gpu_memory or g.memory_bytes, bf16_tflops=g.bf16_tflops,
        intra_node_bandwidth_bytes_per_s=g.intra_node_bandwidth_bytes_per_s,
        inter_node_bandwidth_bytes_per_s=inter,
        cpu_memory_bytes=h.cpu_memory or DEFAULT_CPU_MEMORY_BYTES,
        nvme_path=h.nvme_path,
        nvme_capacity_bytes=(h.nvme_capacity or DEFAULT_NVME_CAPACITY_BYTES) if h.nvme_path else 0,
        supports_bf16=g.supports_bf16, expandable_segments=h.expandable_segments)


def resolve_train(cfg: RunConfig) -> TrainSpec:
    t, lo = cfg.train, cfg.lora
    targets = (lo.targets,) if isinstance(lo.targets, str) else tuple(lo.targets)
    return TrainSpec(
        seq_len=t.seq_len, micro_batch_size=t.micro_batch, global_batch_size=t.global_batch,
        precision=t.precision, method=t.method,
        lora=LoraSpec(rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=targets),
        optimizer=t.optimizer, grad_ckpt=t.grad_ckpt, selective_every=t.selective_every,
        attention=t.attention, strategy=None if t.strategy is Auto.AUTO else t.strategy,
        allow_optimizer_change=t.allow_optimizer_change, allow_method_change=t.allow_method_change,
        headroom_fraction=t.headroom, loss=t.loss, loss_chunk_tokens=t.loss_chunk_tokens,
        activation_offload=t.activation_offload, parallel=resolve_parallel(cfg),
        tiled_mlp=t.tiled_mlp, ckpt_offload=t.ckpt_offload, runner=t.runner,
        runner_transformers=t.runner_transformers)


def resolve_parallel(cfg: RunConfig) -> ParallelRequest:
    """The forced mesh dims of `parallel:` (auto -> None)."""
    p = cfg.parallel
    return ParallelRequest(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, cp=p.cp,
                           cp_mode=None if p.cp_mode is Auto.AUTO else p.cp_mode)


def resolve_specs(cfg: RunConfig) -> tuple[ModelSpec, HardwareSpec, TrainSpec]:
    return resolve_model(cfg), resolve_hardware(cfg), resolve_train(cfg)
