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
    FSDP_OFFLOAD = "fsdp_offload"
    """FSDP2 full shard + CPUOffloadPolicy: the sharded params, the sharded grads and the optimizer step
    live on the host; the GPU holds only the units being gathered (Answer.AI's 70B QLoRA on 2 × 24 GB)."""
    ZERO3_OPT_OFFLOAD = "zero3_opt_offload"
    """ZeRO-3 with offload_optimizer cpu and no offload_param: 16-bit param partitions stay on the GPU,
    fp32 master + optimizer states + the step on the host (the HF Ulysses / ALST benchmark setup)."""

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
                Strategy.ZERO3_OFFLOAD: 3, Strategy.ZERO_INFINITY: 3, Strategy.ZERO3_OPT_OFFLOAD: 3}.get(self, 0)

    @property
    def offload_optimizer(self) -> "OffloadDevice":
        """Where the optimizer states and step live (FSDP_OFFLOAD: torch's optimizer on the host shards)."""
        if self in (Strategy.ZERO2_OFFLOAD, Strategy.ZERO3_OFFLOAD, Strategy.ZERO3_OPT_OFFLOAD, Strategy.FSDP_OFFLOAD):
            return OffloadDevice.CPU
        if self is Strategy.ZERO_INFINITY:
            return OffloadDevice.NVME
        return OffloadDevice.NONE

    @property
    def offload_params(self) -> "OffloadDevice":
        """Where the sharded parameters live between gathers (FSDP_OFFLOAD: CPUOffloadPolicy)."""
        if self in (Strategy.ZERO3_OFFLOAD, Strategy.FSDP_OFFLOAD):
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
                        Strategy.FSDP_FULL_SHARD, Strategy.FSDP_HYBRID_SHARD, Strategy.FSDP_OFFLOAD,
                        Strategy.ZERO3_OPT_OFFLOAD)

    @property
    def deepspeed_offload(self) -> bool:
        """DeepSpeed ZeRO-Offload / Infinity (DeepSpeedCPUAdam, offload_* config blocks) — not FSDP2's
        CPUOffloadPolicy, which steps torch's own optimizer on the host shards."""
        return self.engine is Engine.DEEPSPEED and self.offloads


class Engine(_StrEnum):
    DDP = "ddp"
    FSDP = "fsdp"
    DEEPSPEED = "deepspeed"


class OffloadDevice(_StrEnum):
    NONE = "none"
    CPU = "cpu"
    NVME = "nvme"


class Precision(_StrEnum):
    """bf16/fp16 = mixed precision (16-bit compute, fp32 master weights); fp32 = pure fp32;
    bf16_pure = pure bf16: model, gradients and optimizer states in bf16, no fp32 master and no autocast
    (torchtune's `dtype: bf16`, its default; Answer.AI fsdp_qlora train.py `--precision bf16`)."""
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"
    BF16_PURE = "bf16_pure"

    @property
    def param_bytes(self) -> int:
        """Bytes per element of the compute dtype (activations, gathered / frozen weights)."""
        return 4 if self is Precision.FP32 else 2

    @property
    def trainable_bytes(self) -> int:
        """Bytes per element of a trainable parameter as DDP / FSDP2 store it, of its gradient and of a torch
        optimizer's per-element state (torch AdamW/SGD and our Lion/Adafactor allocate states like the
        parameter): fp32 except in pure bf16."""
        return 2 if self is Precision.BF16_PURE else 4

    @property
    def autocast(self) -> bool:
        """Mixed precision: 16-bit compute over fp32 parameters (autocast / MixedPrecisionPolicy)."""
        return self in (Precision.BF16, Precision.FP16)

    @property
    def is_bf16(self) -> bool:
        return self in (Precision.BF16, Precision.BF16_PURE)


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
    """Activation checkpointing. full: every decoder layer keeps only its input; selective: every k-th
    layer (train.selective_every) is fully checkpointed; op: every layer under torchtitan's op-level
    selective policy — the outputs of every other matmul and of attention are kept, the rest recomputed
    (compiler/op_ckpt.py); auto: the planner picks the fastest that fits."""
    AUTO = "auto"
    NONE = "none"
    FULL = "full"
    SELECTIVE = "selective"
    OP = "op"


class Attention(_StrEnum):
    """sdpa/flash keep O(s) attention memory; eager materialises the a·s² score matrices."""
    SDPA = "sdpa"
    FLASH = "flash"
    EAGER = "eager"


class LossMode(_StrEnum):
    """How the output projection + cross-entropy run. full: the whole fp32 logits tensor exists
    (HF ForCausalLMLoss); chunked: projection + fp32 CE chunk by chunk under checkpointing
    (shardtrain/runtime/loss.py); auto: the planner evaluates both and picks chunked exactly when it lets a faster
    plan fit or the full path does not fit (the HF runners have only full: compiler/runner.py)."""
    AUTO = "auto"
    FULL = "full"
    CHUNKED = "chunked"


class ActivationOffload(_StrEnum):
    """Where saved activations live between forward and backward (cpu: pinned host memory via
    torch.autograd.graph.save_on_cpu)."""
    NONE = "none"
    CPU = "cpu"


class CkptOffload(_StrEnum):
    """Where the checkpointed layer inputs (the one tensor each checkpointed decoder layer keeps between
    forward and backward: p · h · tokens bytes) live (ALST, arXiv:2506.13996 §3 "activation checkpoint
    offload to CPU"). cpu: host memory (pinned on CUDA), brought back for the layer's recompute; off:
    device memory; auto: the planner offloads only when no plan fits with them on the device.
    With activation_offload cpu it is redundant: save_on_cpu already moves every saved tensor of the
    forward, the checkpointed inputs included (compiler/activations.py)."""
    AUTO = "auto"
    OFF = "off"
    CPU = "cpu"


class Runner(_StrEnum):
    """The program that runs the plan (compiler/runner.py models the difference). shardtrain: our runtime
    (`shardtrain launch`); hf_trainer: transformers' Trainer on the emitted TrainingArguments (`emit
    --format trainer`); accelerate: `accelerate launch` of the user's script on the emitted accelerate
    config (`emit --format accelerate`: FSDP2 per decoder layer + root). The HF runners compute the loss
    inside the model's forward (`model(input_ids, labels=...)`), have no chunked loss and no op-level
    checkpointing."""
    SHARDTRAIN = "shardtrain"
    HF_TRAINER = "hf_trainer"
    ACCELERATE = "accelerate"


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
    expandable_segments: bool = True
    """The ranks run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (what shardtrain's Slurm jobs
    export: launcher/rankstart.py CLUSTER_ENV): the CUDA caching allocator grows one segment per stream
    instead of caching fixed segments, so reserved stays close to allocated (compiler/allocator.py).
    False: PyTorch's default allocator (more fragmentation, planned with a larger reserved peak)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


class CpMode(_StrEnum):
    """How context parallel (cp) splits one sequence's attention across cp ranks; every rank holds
    seq_len / cp tokens of every layer's activations either way.

    ulysses: DeepSpeed-Ulysses (Jacobs et al. 2023, arXiv:2309.14509): an all-to-all turns the
    sequence-sharded q/k/v into head-sharded full-sequence q/k/v, attention runs locally on heads / cp
    heads, a second all-to-all turns the output back (4 all-to-alls per layer with backward); needs
    heads % cp == 0 and seq_len % cp == 0; any attention kernel. ring: ring attention (Liu et al. 2023,
    arXiv:2310.01889) as torch.distributed.tensor.experimental.context_parallel runs it: K/V blocks pass
    around the cp ranks, overlapped with attention; needs seq_len % (2 * cp) == 0 (load-balanced
    halves) and a CUDA SDPA kernel (flash / memory-efficient / cuDNN); no CPU kernel has its sharding rule."""
    ULYSSES = "ulysses"
    RING = "ring"


#: Mesh dimension names, outermost first: the order torchtitan's ParallelDims and accelerate's
#: ParallelismConfig build the device mesh in (tp innermost so it stays inside a node).
MESH_DIM_NAMES = ("dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """The device mesh of a plan: dp_replicate × dp_shard × cp × tp = world size.

    Model state (FSDP2 / ZeRO) is sharded over dp_shard × cp (as accelerate's ``dp_shard_cp`` and
    torchtitan's ``dp_shard_cp`` mesh do: cp ranks hold different tokens of the same samples, so they
    are data-parallel for the weights); replicated over dp_replicate (HSDP: DDP across replicas of a
    sharded group); tp splits each linear layer (Megatron-LM column/row parallel, Shoeybi et al. 2019).
    Gradients are reduced over dp_replicate × dp_shard × cp. Samples per step are spread over
    dp = dp_replicate × dp_shard only: tp and cp ranks share their samples."""
    dp_replicate: int = 1
    """Replicas of the sharded model state (HSDP's replicate dim; DDP is dp_replicate = world)."""
    dp_shard: int = 1
    """Ranks the model state is sharded over (with cp), each with its own samples."""
    cp: int = 1
    """Context-parallel ranks: each holds seq_len / cp tokens of the same samples."""
    tp: int = 1
    """Tensor-parallel ranks: each holds 1/tp of every linear layer (and, with sequence parallel,
    1/tp of the tokens outside attention/MLP)."""
    cp_mode: CpMode = CpMode.ULYSSES
    """How cp splits attention (only meaningful when cp > 1)."""

    def __post_init__(self):
        for k in MESH_DIM_NAMES:
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"parallel.{k}: {v!r} must be an integer >= 1")
        if not isinstance(self.cp_mode, CpMode):
            object.__setattr__(self, "cp_mode", CpMode(self.cp_mode))

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel ranks: the ranks that take different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_shard(self) -> int:
        """Ranks one copy of the (tp-local) model state is sharded over: dp_shard × cp."""
        return self.dp_shard * self.cp

    @property
    def grad_reduce(self) -> int:
        """Ranks a gradient is averaged over: dp × cp (tp ranks own different slices)."""
        return self.dp * self.cp

    @property
    def is_hsdp(self) -> bool:
        return self.dp_replicate > 1 and self.fsdp_shard > 1

    @property
    def is_data_parallel_only(self) -> bool:
        return self.tp == 1 and self.cp == 1

    @property
    def shape(self) -> tuple[int, ...]:
        """Sizes in MESH_DIM_NAMES order."""
        return tuple(getattr(self, k) for k in MESH_DIM_NAMES)

    def label(self) -> str:
        """e.g. "dp_replicate 2 × dp_shard 4 × tp 2" (dims of size 1 left out; "dp_shard 1" for one rank)."""
        parts = [f"{k} {getattr(self, k)}" + (f" ({self.cp_mode.value})" if k == "cp" else "")
                 for k in MESH_DIM_NAMES if getattr(self, k) > 1]
        return " × ".join(parts) or "dp_shard 1"

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in MESH_DIM_NAMES}, "cp_mode": self.cp_mode.value,
                "world_size": self.world, "dp": self.dp, "fsdp_shard": self.fsdp_shard}

    @staticmethod
    def from_json(d: dict) -> "ParallelDims":
        return ParallelDims(**{k: int(d[k]) for k in MESH_DIM_NAMES}, cp_mode=CpMode(d.get("cp_mode", "ulysses")))

    @staticmethod
    def for_strategy(strategy: "Strategy", world_size: int, gpus_per_node: int) -> "ParallelDims":
        """The 1-D mesh each strategy meant before the mesh existed (and what plans without a
        "parallel" key mean): DDP replicates over every rank; fsdp_hybrid_shard is HSDP with one
        replica per node (dp_replicate = nodes, dp_shard = GPUs per node); every other strategy
        shards over every rank."""
        if strategy is Strategy.DDP:
            return ParallelDims(dp_replicate=world_size)
        if strategy is Strategy.FSDP_HYBRID_SHARD and world_size > gpus_per_node:
            return ParallelDims(dp_replicate=world_size // gpus_per_node, dp_shard=gpus_per_node)
        return ParallelDims(dp_shard=world_size)


@dataclass(frozen=True)
class ParallelRequest:
    """The mesh dims a run config forces (`parallel:` keys, `--tp`/`--cp`/... flags); None = auto
    (the planner searches it)."""
    dp_replicate: int | None = None
    dp_shard: int | None = None
    cp: int | None = None
    tp: int | None = None
    cp_mode: CpMode | None = None

    @property
    def is_auto(self) -> bool:
        return all(getattr(self, k) is None for k in (*MESH_DIM_NAMES, "cp_mode"))

    def admits(self, p: ParallelDims) -> bool:
        """Whether mesh ``p`` honours every forced dim."""
        return (all(getattr(self, k) in (None, getattr(p, k)) for k in MESH_DIM_NAMES)
                and (self.cp_mode is None or p.cp == 1 or self.cp_mode is p.cp_mode))

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in MESH_DIM_NAMES},
                "cp_mode": self.cp_mode.value if self.cp_mode else None}

    @staticmethod
    def from_json(d: dict | None) -> "ParallelRequest":
        d = d or {}
        return ParallelRequest(**{k: d.get(k) for k in MESH_DIM_NAMES},
                               cp_mode=CpMode(d["cp_mode"]) if d.get("cp_mode") else None)


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
    headroom_fraction: float = 0.0
    """Extra fraction of GPU memory kept free, on top of the modelled reserved peak + CUDA context
    (compiler/allocator.py). Until issue 19 it was a flat 0.05 standing for allocator fragmentation,
    which the allocator model now predicts; a user margin now, 0 by default."""
    loss: LossMode = LossMode.AUTO
    """Logits path: full, chunked, or auto (the default: chunked exactly when it lets a faster plan fit or
    the full path does not fit; compiler/loss_choice.py)."""
    loss_chunk_tokens: int = 512
    """Tokens per chunk of the chunked loss (torchtune CEWithChunkedOutputLoss: 8 chunks of the
    sequence = 512 tokens at b=2, s=2048)."""
    activation_offload: ActivationOffload = ActivationOffload.NONE
    """Saved activations to host RAM (cpu) — the planner only picks it when nothing faster fits."""
    parallel: ParallelRequest = field(default_factory=ParallelRequest)
    """Forced device-mesh dims (tp, cp, dp_replicate, dp_shard, cp_mode); unforced ones are searched."""
    runner: Runner = Runner.SHARDTRAIN
    """What runs the plan: our runtime, the HF Trainer or accelerate (their loss path: compiler/runner.py)."""
    runner_transformers: str | None = None
    """The transformers version the HF runners use (older ones keep more fp32 logits copies:
    compiler/runner.py); None = the current line (>= 4.49)."""
    tiled_mlp: int | None = None
    """Tiled MLP (ALST, arXiv:2506.13996 §3; DeepSpeed TiledMLP): every decoder layer's MLP computed in this
    many sequence tiles; it saves only its input for backward and recomputes each tile there, so the MLP
    intermediates exist for seq / N tokens at a time (its own recompute: it works with or without
    checkpointing, one more MLP forward per step either way). None = auto (the planner tiles only when
    that lets a faster plan fit or nothing fits untiled), 1 = off, N >= 2 = N tiles."""
    ckpt_offload: CkptOffload = CkptOffload.AUTO
    """Checkpointed layer inputs in host memory between forward and backward (see CkptOffload)."""


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
