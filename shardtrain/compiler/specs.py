"""Enums and input specs of the compiler (pure data; no torch, no I/O).

Strategies are enums, never strings, so every `match` over them is exhaustive and typo-proof.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class _StrEnum(str, enum.Enum):
    def __str__(self) -> str:
        return self.value


class Strategy(_StrEnum):
    """How model state is replicated or sharded across data-parallel ranks."""
    DDP = "ddp"
    ZERO1 = "zero1"
    ZERO2 = "zero2"
    ZERO3 = "zero3"
    FSDP_FULL_SHARD = "fsdp_full_shard"
    FSDP_SHARD_GRAD_OP = "fsdp_shard_grad_op"
    FSDP_HYBRID_SHARD = "fsdp_hybrid_shard"
    ZERO2_OFFLOAD = "zero2_offload"
    ZERO3_OFFLOAD = "zero3_offload"
    ZERO_INFINITY = "zero_infinity"

    @property
    def engine(self) -> "Engine":
        if self is Strategy.DDP:
            return Engine.DDP
        if self.value.startswith("fsdp"):
            return Engine.FSDP
        return Engine.DEEPSPEED

    @property
    def zero_stage(self) -> int:
        """DeepSpeed ZeRO stage (0 for non-DeepSpeed strategies)."""
        return {Strategy.ZERO1: 1, Strategy.ZERO2: 2, Strategy.ZERO3: 3, Strategy.ZERO2_OFFLOAD: 2,
                Strategy.ZERO3_OFFLOAD: 3, Strategy.ZERO_INFINITY: 3}.get(self, 0)

    @property
    def offload_optimizer(self) -> "OffloadDevice":
        if self in (Strategy.ZERO2_OFFLOAD, Strategy.ZERO3_OFFLOAD):
            return OffloadDevice.CPU
        if self is Strategy.ZERO_INFINITY:
            return OffloadDevice.NVME
        return OffloadDevice.NONE

    @property
    def offload_params(self) -> "OffloadDevice":
        if self is Strategy.ZERO3_OFFLOAD:
            return OffloadDevice.CPU
        if self is Strategy.ZERO_INFINITY:
            return OffloadDevice.NVME
        return OffloadDevice.NONE

    @property
    def offloads(self) -> bool:
        """Optimizer (and with ZeRO-3, parameters) live on the host or NVMe."""
        return self.offload_optimizer is not OffloadDevice.NONE

    @property
    def shards_params(self) -> bool:
        return self in (Strategy.ZERO3, Strategy.ZERO3_OFFLOAD, Strategy.ZERO_INFINITY,
                        Strategy.FSDP_FULL_SHARD, Strategy.FSDP_HYBRID_SHARD)


class Engine(_StrEnum):
    DDP = "ddp"
    FSDP = "fsdp"
    DEEPSPEED = "deepspeed"


class OffloadDevice(_StrEnum):
    NONE = "none"
    CPU = "cpu"
    NVME = "nvme"


class Precision(_StrEnum):
    """bf16/fp16 = mixed precision (16-bit compute, fp32 master weights); fp32 = pure fp32."""
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def param_bytes(self) -> int:
        return 4 if self is Precision.FP32 else 2


class Method(_StrEnum):
    FULL = "full"
    LORA = "lora"
    QLORA = "qlora"


class Optimizer(_StrEnum):
    ADAMW = "adamw"
    ADAMW8BIT = "adamw8bit"
    ADAFACTOR = "adafactor"
    LION = "lion"
    SGD = "sgd"


class GradCkpt(_StrEnum):
    AUTO = "auto"
    NONE = "none"
    FULL = "full"
    SELECTIVE = "selective"


class Attention(_StrEnum):
    """sdpa/flash keep O(s) attention memory; eager materialises the a·s² score matrices."""
    SDPA = "sdpa"
    FLASH = "flash"
    EAGER = "eager"


class LossMode(_StrEnum):
    """How the output projection + cross-entropy run. full: the whole fp32 logits tensor exists
    (HF ForCausalLMLoss); chunked: projection + fp32 CE chunk by chunk under checkpointing
    (shardtrain/runtime/loss.py); auto: the planner picks chunked when the full path costs more."""
    AUTO = "auto"
    FULL = "full"
    CHUNKED = "chunked"


class ActivationOffload(_StrEnum):
    """Where saved activations live between forward and backward (cpu: pinned host memory via
    torch.autograd.graph.save_on_cpu)."""
    NONE = "none"
    CPU = "cpu"


class CompileMode(_StrEnum):
    """torch.compile in the runtime (issue 11). blocks: each decoder layer compiled in place before
    the engine wraps the model (torchtitan's per-block compile, repeated layers reuse one graph);
    model: the whole module once; none: eager."""
    NONE = "none"
    BLOCKS = "blocks"
    MODEL = "model"


@dataclass(frozen=True)
class HardwareSpec:
    """The machines a job runs on. Bandwidths are per GPU, unidirectional, usable (not peak)."""
    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 8
    """GPUs (ranks) per node."""
    gpu_name: str = "h100-80gb"
    """GPU preset name (informational once the numbers below are resolved)."""
    gpu_memory_bytes: int = 80 * 2**30
    """Usable memory of one GPU as CUDA reports it (total, before our headroom)."""
    bf16_tflops: float = 989.0
    """Dense bf16 tensor-core peak, TFLOP/s, per GPU."""
    intra_node_bandwidth_bytes_per_s: float = 450e9
    """NVLink/PCIe bandwidth per GPU inside a node (unidirectional)."""
    inter_node_bandwidth_bytes_per_s: float = 50e9
    """Network bandwidth per GPU between nodes (e.g. 400 Gb/s IB per GPU = 50 GB/s)."""
    pcie_bandwidth_bytes_per_s: float = 25e9
    """Host<->device usable bandwidth per GPU (PCIe Gen4 x16 ≈ 25 GB/s, architecture notes)."""
    cpu_memory_bytes: int = 1024 * 2**30
    """Host RAM per node."""
    cpu_adam_params_per_s: float = 1.0e9
    """DeepSpeedCPUAdam throughput per node (params updated per second; AVX512, ~32 cores)."""
    nvme_path: str | None = None
    """Local NVMe mount for ZeRO-Infinity; None disables NVMe strategies."""
    nvme_capacity_bytes: int = 0
    """Free NVMe bytes per node."""
    nvme_bandwidth_bytes_per_s: float = 6e9
    """Aggregate NVMe read/write bandwidth per node."""
    supports_bf16: bool = True
    """False for pre-Ampere GPUs (V100)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapter settings (Hu et al. 2021)."""
    rank: int = 16
    """Adapter rank r: each adapted Linear(in, out) gains r·(in + out) trainable params."""
    alpha: int = 32
    """Scaling numerator (update scaled by alpha / rank)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Leaf module names to adapt; "all-linear" is expanded by the compiler."""


@dataclass(frozen=True)
class TrainSpec:
    """The training job. `None` means: let the planner choose."""
    seq_len: int = 4096
    """Tokens per sample."""
    micro_batch_size: int | None = None
    """Samples per rank per forward/backward; None = auto."""
    global_batch_size: int = 64
    """Samples per optimizer step = micro × accumulation × data-parallel size (exactly)."""
    precision: Precision = Precision.BF16
    method: Method = Method.FULL
    lora: LoraSpec = field(default_factory=LoraSpec)
    optimizer: Optimizer = Optimizer.ADAMW
    grad_ckpt: GradCkpt = GradCkpt.AUTO
    selective_every: int = 2
    """With grad_ckpt=selective: checkpoint every k-th decoder layer."""
    attention: Attention = Attention.SDPA
    strategy: Strategy | None = None
    """Forced strategy; None = auto."""
    allow_optimizer_change: bool = False
    """Let the planner try other optimizers (e.g. 8-bit AdamW) when the requested one does not fit."""
    allow_method_change: bool = False
    """Let the planner try LoRA/QLoRA when full fine-tuning does not fit."""
    headroom_fraction: float = 0.05
    """Fraction of GPU memory kept free for allocator fragmentation (calibratable)."""
    loss: LossMode = LossMode.FULL
    """Logits path: full, chunked, or auto (chunked when the full path costs more than a chunk)."""
    loss_chunk_tokens: int = 512
    """Tokens per chunk of the chunked loss (torchtune CEWithChunkedOutputLoss: 8 chunks of the
    sequence = 512 tokens at b=2, s=2048)."""
    activation_offload: ActivationOffload = ActivationOffload.NONE
    """Saved activations to host RAM (cpu) — the planner only picks it when nothing faster fits."""


class Launcher(_StrEnum):
    """The program that starts the ranks (launcher/ owns its argv). auto (config only): deepspeed for
    ZeRO plans, torchrun otherwise."""
    AUTO = "auto"
    TORCHRUN = "torchrun"
    DEEPSPEED = "deepspeed"


class Device(_StrEnum):
    """run.device: auto = CUDA when GPUs are visible, else CPU (gloo)."""
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Resume(_StrEnum):
    """run.resume: auto = continue from the run dir's last complete checkpoint; never = start over."""
    AUTO = "auto"
    NEVER = "never"


class Export(_StrEnum):
    """run.export: what final/ holds after a LoRA run (full fine-tuning always writes the full weights).
    adapter = the peft adapter; merged = full weights with the adapter merged in (W + B·A·alpha/r, peft's
    merge_and_unload), loadable with AutoModelForCausalLM.from_pretrained; both = the adapter in final/
    and the merged weights in final/merged/."""
    ADAPTER = "adapter"
    MERGED = "merged"
    BOTH = "both"


class DataFormat(_StrEnum):
    """data.format of the training file (auto: from the extension/contents)."""
    AUTO = "auto"
    JSONL = "jsonl"
    TEXT = "text"


class ModelInit(_StrEnum):
    """model.init: auto = the checkpoint's weights when its directory has them, else random init."""
    AUTO = "auto"
    RANDOM = "random"
    PRETRAINED = "pretrained"
