"""What a rank needs beyond the plan's decisions: plan.json's "runtime" object (`RuntimeFacts`).

The launcher (and `shardtrain emit`) resolve these once from the run config with the emitters
(shardtrain/emit/runtime.py) and attach them to the Plan before writing plan.json, so the runtime
reads facts instead of re-running the compiler, the presets or the emitters: where the model and the
data come from, the predicted model-state bytes it compares its measurement with, the FLOPs per token and GPU
peak behind MFU, and the engine settings (FSDP2 settings, the DeepSpeed config) the plan was emitted
with. Pure data: no torch, no file access. `shardtrain plan --json` never carries them (the planner
leaves `Plan.runtime` unset), so its output and the goldens do not change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class FsdpSettings:
    """Everything the runtime needs to wrap a model with FSDP2 for one plan (fsdp.json)."""
    sharding: str
    """FULL_SHARD | SHARD_GRAD_OP | HYBRID_SHARD (informational; the fields below implement it)."""
    reshard_after_forward: bool
    """fully_shard(reshard_after_forward=...): True frees gathered params after forward."""
    mesh_shape: tuple[int, ...]
    """DeviceMesh shape: (world,) or (nodes, gpus_per_node) for HYBRID_SHARD."""
    mesh_dim_names: tuple[str, ...]
    """("dp_shard",) or ("dp_replicate", "dp_shard")."""
    param_dtype: str
    """MixedPrecisionPolicy.param_dtype (torch dtype name): compute/all-gather dtype."""
    reduce_dtype: str
    """MixedPrecisionPolicy.reduce_dtype: gradient reduce-scatter dtype (fp32 for accuracy)."""
    wrap_class: str
    """Decoder-layer class name: each instance becomes one fully_shard unit (plus the root)."""
    wrap_class_source: str
    """Where wrap_class came from: "transformers:<ModelClass>._no_split_modules" or "model spec"."""
    activation_checkpointing: str
    """none | full | selective (checkpoint every `checkpoint_every`-th wrapped layer)."""
    checkpoint_every: int
    """1 for full, k for selective, 0 for none."""
    defer_grad_sync: bool
    """set_requires_gradient_sync(False) on non-final micro-steps (unsharded fp32 grads held)."""
    world_size: int
    """Data-parallel ranks the plan was made for."""
    output_dtype: str | None = None
    """MixedPrecisionPolicy.output_dtype (None: leave forward outputs in param_dtype)."""
    cast_forward_inputs: bool = True
    """MixedPrecisionPolicy.cast_forward_inputs."""
    cpu_offload: bool = False
    """Use CPUOffloadPolicy (sharded params, grads and optimizer step on the host)."""
    offload_pin_memory: bool = True
    """CPUOffloadPolicy(pin_memory=...); must be False on CPU-only hosts."""
    use_reentrant: bool = False
    """torch.utils.checkpoint use_reentrant: False works with frozen params (LoRA) and FSDP2."""
    state_dict_type: str = "SHARDED_STATE_DICT"
    """Checkpoint format: SHARDED_STATE_DICT (DCP, per rank) or FULL_STATE_DICT."""
    cpu_ram_efficient_loading: bool = True
    """Load weights on rank 0 only (others on meta) and broadcast shards: host RAM ~1x, not Nx."""
    quant_storage_dtype: str | None = None
    """QLoRA: bnb_4bit_quant_storage; must equal param_dtype so 4-bit weights shard with the rest."""
    version: int = 2
    """FSDP API version (2 = fully_shard)."""

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "FsdpSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"fsdp settings: unknown keys {unknown}; regenerate with `shardtrain emit`")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if kw.get("version", 2) != 2:
            raise ValueError(f"fsdp settings: version {kw['version']!r} is not supported; only FSDP2 (2)")
        return cls(**kw)


@dataclass(frozen=True)
class ModelRef:
    """Where the runtime loads the model from, resolved when the run dir was written."""
    name: str | None
    """model.name as given (preset, config.json, checkpoint dir, Hub id); None for a `--params` shape."""
    checkpoint_dir: str | None
    """A directory with config.json (a checkpoint, or the cached snapshot of a Hub id): the runtime reads
    its config, tokenizer and, when present, weights there."""
    hf_config: dict | None
    """config.json contents when there is no directory (a preset, a config.json path, a `--params` shape)."""
    init: str = "auto"
    """model.init: auto (the directory's weights when it has some) | random | pretrained."""


@dataclass(frozen=True)
class StateBytes:
    """Predicted steady-state model-state bytes per rank (compiler/memory.py model_state_bytes of the
    chosen candidate): what the runtime's memory report compares its measurement with."""
    params: int
    grads: int
    master_params: int
    optimizer_states: int
    buffers: int
    host_bytes: int
    """Host RAM per rank (ZeRO-Offload / FSDP CPU offload: master, states, grads on the CPU)."""

    def device_terms(self) -> dict[str, int]:
        return {"params": self.params, "grads": self.grads, "master_params": self.master_params,
                "optimizer_states": self.optimizer_states}


@dataclass(frozen=True)
class RuntimeFacts:
    model: ModelRef
    state_bytes: StateBytes
    model_flops_per_token: float
    """compiler/flops.py train_flops_per_token(...).model: PaLM model FLOPs per trained token."""
    recompute_flops_per_layer_token: float
    """Hardware FLOPs added per token by each checkpointed (recomputed) decoder layer."""
    num_layers: int
    peak_tflops: float
    """The GPU preset's dense peak for the plan's precision (0: unknown): the MFU denominator on CUDA."""
    data_train: str | None = None
    """data.train as the ranks read it: a Hub dataset id resolved to its cached snapshot (config/hub.py)."""
    data_eval: str | None = None
    """data.eval, resolved the same way."""
    fsdp: FsdpSettings | None = None
    """FSDP plans: the settings fsdp.json was written with."""
    deepspeed: dict | None = None
    """DeepSpeed plans: the config ds_config.json was written with (emit/deepspeed.py)."""
    deepspeed_client_optimizer: bool = False
    """The DeepSpeed config has no optimizer block: the runtime builds the optimizer and passes it."""
    deepspeed_cpu_config: dict | None = None
    """The config to use on a CPU-only host when DeepSpeed's own optimizer is a CUDA kernel (its Lion
    is FusedLion): same without the optimizer block; the runtime then passes its own optimizer."""

    def hardware_flops_per_token(self, checkpointed_layers: int) -> float:
        """Model FLOPs plus the forward recomputed by `checkpointed_layers` layers (compiler/flops.py)."""
        k = max(0, min(checkpointed_layers, self.num_layers))
        return self.model_flops_per_token + k * self.recompute_flops_per_layer_token

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["fsdp"] = self.fsdp.to_dict() if self.fsdp else None
        return d

    @staticmethod
    def from_json(d: dict) -> "RuntimeFacts":
        d = dict(d)
        return RuntimeFacts(**{**d, "model": ModelRef(**d["model"]), "state_bytes": StateBytes(**d["state_bytes"]),
                               "fsdp": FsdpSettings.from_dict(d["fsdp"]) if d.get("fsdp") else None})


def utilisation(flops_per_token: float, tokens_per_s_per_device: float, peak_tflops: float) -> float:
    """Achieved FLOP/s per device over the device's peak (0 when the peak is unknown): MFU with model
    FLOPs, HFU with hardware FLOPs (compiler/flops.py; the runtime's Throughput reports both)."""
    if peak_tflops <= 0:
        return 0.0
    return flops_per_token * tokens_per_s_per_device / (peak_tflops * 1e12)
