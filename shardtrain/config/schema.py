"""The user-facing run config: YAML → strictly validated, frozen dataclasses.

Every key a flag can set, a key can set (config/flags.py). Choices are the compiler's enums
(compiler/specs.py). Unknown keys, wrong types and impossible values raise `ConfigError` naming the key,
the bad value and a fix (nearest valid key by difflib; value coercion: config/coerce.py).
"""
from __future__ import annotations

import dataclasses
import enum
import typing
from dataclasses import dataclass, field
from pathlib import Path

from shardtrain.compiler.specs import (ActivationOffload, Attention, CkptOffload, CompileMode, CpMode, DataFormat, Device,
                                       Export, GradCkpt, Launcher, LoraSpec, LossMode, Method, ModelInit, Optimizer,
                                       Precision, Resume, Runner, Strategy, TrainSpec)
from shardtrain.config.coerce import Auto, AutoInt, AutoOffInt, Bytes, ConfigError, Count, coerce, nearest

# The job's defaults are the compiler's (TrainSpec, LoraSpec): one place to change them.
_TRAIN, _LORA = TrainSpec(), LoraSpec()

__all__ = ["ConfigError", "ModelConfig", "HardwareConfig", "LoraConfig", "TrainConfig", "DataConfig", "RunSection",
           "ParallelConfig", "RunConfig", "parse_run_config", "load_run_config", "set_dotted"]


@dataclass(frozen=True)
class ModelConfig:
    name: str | None = None
    """Preset name (`shardtrain presets`), a config.json path or a Hugging Face checkpoint directory."""
    params: Count | None = None
    """Parameter count instead of a name (e.g. 7.5e9); dims below are optional."""
    hidden: int | None = None
    """Hidden size (with `params`)."""
    layers: int | None = None
    """Decoder layers (with `params`)."""
    heads: int | None = None
    """Attention heads (with `params`)."""
    kv_heads: int | None = None
    """Key/value heads, GQA (with `params`)."""
    vocab: int | None = None
    """Vocabulary size (with `params`)."""
    intermediate: int | None = None
    """MLP intermediate size (with `params`)."""
    init: ModelInit = ModelInit.AUTO
    """auto (checkpoint weights when the directory has them, else random) | random | pretrained."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the checkpoint's, else the bundled byte-level tokenizer."""


@dataclass(frozen=True)
class HardwareConfig:
    nodes: int = 1
    """Number of nodes."""
    gpus_per_node: int = 8
    """GPUs (processes) per node."""
    gpu: str = "h100-80gb"
    """GPU preset (memory, TFLOP/s, bandwidths): `shardtrain presets`."""
    gpu_memory: Bytes | None = None
    """Override the preset's GPU memory, with its unit: 80GiB (2**30) or 80GB (10**9). A bare number under
    1 MiB is refused (80 is a forgotten unit, not 80 bytes); from 1 MiB up it is bytes (shardtrain/units.py)."""
    cpu_memory: Bytes | None = None
    """Host RAM per node, with its unit, e.g. 1TiB (default 1 TiB)."""
    nvme_path: str | None = None
    """Local NVMe directory for ZeRO-Infinity; unset disables NVMe plans."""
    nvme_capacity: Bytes | None = None
    """Free NVMe per node, with its unit, e.g. 2TB (default 3.5 TB when nvme_path is set)."""
    expandable_segments: bool = True
    """true when the ranks run with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (shardtrain's Slurm
    jobs export it); false for PyTorch's default allocator, which fragments more: the plan's reserved peak
    (what must fit) is larger (compiler/allocator.py)."""
    inter_node_bandwidth: Bytes | None = None
    """Network bytes/s per GPU between nodes, with its unit, e.g. 25GB (default: preset)."""


@dataclass(frozen=True)
class LoraConfig:
    rank: int = _LORA.rank
    """Adapter rank r."""
    alpha: int = _LORA.alpha
    """LoRA alpha (update scaled by alpha / rank)."""
    dropout: float = _LORA.dropout
    """Adapter dropout."""
    targets: tuple[str, ...] | str = "all-linear"
    """Module leaf names to adapt, or a preset: peft (peft's default for the model type: q_proj, v_proj on
    Llama) | torchtune (q, v, o + MLP) | axolotl | llama-factory | all-linear (every decoder Linear);
    compiler/lora_presets.py cites each."""


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = _TRAIN.seq_len
    """Tokens per sample."""
    micro_batch: AutoInt | None = None
    """Samples per GPU per micro-step: auto or N."""
    global_batch: int = _TRAIN.global_batch_size
    """Samples per optimizer step (= micro × accumulation × data-parallel ranks)."""
    precision: Precision = _TRAIN.precision
    """bf16 | fp16 | fp32 | bf16_pure. bf16/fp16: mixed precision (16-bit compute, fp32 master weights,
    16 B/param with AdamW). bf16_pure: model, gradients and AdamW states all in bf16 (8 B/param; LoRA
    adapters in bf16 too), no autocast — what torchtune (`dtype: bf16`, its default) and Answer.AI's
    fsdp_qlora (`--precision bf16`) train with. It costs accuracy: with no fp32 master, an update smaller
    than half a bf16 step of the weight (~2^-9 relative) is rounded away. DDP and FSDP2 strategies only."""
    method: Method = _TRAIN.method
    """full | lora | qlora."""
    optimizer: Optimizer = _TRAIN.optimizer
    """adamw | adamw8bit | adafactor | lion | sgd."""
    grad_ckpt: GradCkpt = _TRAIN.grad_ckpt
    """auto | none | full | selective | op (every layer, torchtitan's op-level selective checkpointing:
    every other matmul's output and attention's are kept, the rest recomputed)."""
    selective_every: int = _TRAIN.selective_every
    """With grad_ckpt selective: checkpoint every k-th decoder layer."""
    attention: Attention = _TRAIN.attention
    """sdpa | flash | eager."""
    loss: LossMode = _TRAIN.loss
    """full | chunked (lm_head + fp32 CE in chunks, never the whole logits) | auto (default: chunked exactly when it lets a faster plan fit or the full path does not fit; the
    plan's `why` says which)."""
    loss_chunk_tokens: int = _TRAIN.loss_chunk_tokens
    """Tokens per chunk of the chunked loss."""
    activation_offload: ActivationOffload = _TRAIN.activation_offload
    """none | cpu (allow saved activations in host RAM; used only when no faster plan fits)."""
    tiled_mlp: AutoOffInt | None = _TRAIN.tiled_mlp
    """auto | off | N: every decoder layer's MLP in N sequence tiles (ALST tiled MLP; its intermediates
    exist for seq_len / N tokens at a time, at the cost of one more MLP forward per step; works with or
    without checkpointing). auto: tiled only when that lets a faster plan fit or nothing fits untiled, with
    ceil(tokens per rank's sequence / hidden) tiles (at least 2) as DeepSpeed's TiledMLP example picks; 1 is off."""
    ckpt_offload: CkptOffload = _TRAIN.ckpt_offload
    """auto | off | cpu: the checkpointed layer inputs in host memory (pinned on CUDA) between forward and
    backward (ALST checkpoint offload). auto: only when nothing fits with them on the GPU. Redundant with
    activation_offload cpu, which moves them already."""
    compile: CompileMode = CompileMode.NONE
    """none | blocks (torch.compile each decoder layer, torchtitan-style) | model (the whole model)."""
    runner: Runner = _TRAIN.runner
    """shardtrain | hf_trainer | accelerate: what runs the plan. The HF runners compute the loss inside the
    model (full fp32 logits, the root FSDP unit gathered meanwhile), have no chunked loss and no op-level
    checkpointing; `emit --format trainer | accelerate` plans for them (compiler/runner.py)."""
    runner_transformers: str | None = _TRAIN.runner_transformers
    """The transformers version the HF runners use, e.g. 4.44.2 (before 4.49 the loss kept more fp32
    copies of the logits); unset: the current line."""
    strategy: Auto | Strategy = Auto.AUTO
    """auto or one of the strategies (forces it)."""
    allow_optimizer_change: bool = _TRAIN.allow_optimizer_change
    """Let the planner switch to 8-bit AdamW when the requested optimizer does not fit."""
    allow_method_change: bool = _TRAIN.allow_method_change
    """Let the planner switch to LoRA/QLoRA when full fine-tuning does not fit."""
    headroom: float = _TRAIN.headroom_fraction
    """Extra fraction of GPU memory kept free on top of the modelled reserved peak + CUDA context (0 by
    default; allocator fragmentation is modelled: compiler/allocator.py, hardware.expandable_segments)."""
    lr: float | Auto = Auto.AUTO
    """Peak learning rate; auto: the method's default (DEFAULT_LR: full 1e-5, lora/qlora 2e-4), resolved
    when the config is parsed, so run.yaml, the DeepSpeed JSON and the Trainer args carry the number."""
    min_lr_ratio: float = 0.1
    """Cosine schedule floor as a fraction of lr."""
    warmup_steps: int = 10
    """Linear warmup optimizer steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables)."""
    steps: int = 100
    """Optimizer steps to run."""
    max_nonfinite_steps: int = 10
    """Steps in a row whose loss or gradient norm is not finite (inf/NaN) before the run stops. Each such
    step is skipped (no optimizer update; counted as nonfinite_steps in metrics.jsonl) and training goes
    on; this many in a row stop the run with exit code 65 (exitcodes.EXIT_NONFINITE), the last checkpoint
    intact. fp16 loss scaling skips overflowing steps the same way while it lowers its scale: keep this
    above a handful there."""
    seed: int = 1234
    """Seed for init, sampling and dropout."""


@dataclass(frozen=True)
class ParallelConfig:
    """The device mesh: dp_replicate × dp_shard × cp × tp = nodes × gpus_per_node. Each key is auto (the
    planner searches it with everything else and picks the fastest mesh that fits) or an integer that
    forces it. train.strategy fsdp_hybrid_shard is the mesh dp_replicate = nodes × dp_shard = GPUs per
    node on fsdp_full_shard (HSDP)."""
    dp_replicate: AutoInt | None = None
    """Replicas of the sharded model state (HSDP; DDP replicates over every rank): auto or N."""
    dp_shard: AutoInt | None = None
    """Ranks the model state is sharded over (FSDP2 / ZeRO, with cp), each with its own samples: auto or N."""
    tp: AutoInt | None = None
    """Tensor parallel: each rank holds 1/tp of every linear layer; tp ranks share samples: auto or N
    (1 turns it off)."""
    cp: AutoInt | None = None
    """Context parallel: each rank holds seq_len / cp tokens of the same samples: auto or N (1 turns it off)."""
    cp_mode: Auto | CpMode = Auto.AUTO
    """auto | ulysses (all-to-all around attention; heads % cp == 0; any device) | ring (ring attention,
    torch context_parallel; CUDA only)."""


@dataclass(frozen=True)
class DataConfig:
    train: str | None = None
    """Training data: .jsonl (text, prompt/completion or chat messages), .parquet/.arrow, a `datasets`
    save_to_disk directory, a Hub dataset id in the local HF cache, or plain text."""
    eval: str | None = None
    """Held-out data; unset: the last eval_fraction of train."""
    eval_fraction: float = 0.05
    """Fraction of train held out when eval is unset."""
    format: DataFormat = DataFormat.AUTO
    """auto | jsonl | text."""
    packing: bool = True
    """Pack samples into seq_len blocks (else pad to the longest in the batch)."""
    chat_template: str | None = None
    """Chat `messages` data: Jinja chat template (string or .jinja file), or `default` (shardtrain's);
    unset: the tokenizer's own."""


@dataclass(frozen=True)
class RunSection:
    output_dir: str = "runs"
    """Parent directory of run directories."""
    name: str | None = None
    """Run directory name (default: derived from the config file name)."""
    checkpoint_every: int = 50
    """Save every N optimizer steps (and at the end); 0 = only at the end."""
    eval_every: int = 50
    """Evaluate every N optimizer steps; 0 disables."""
    eval_batches: int = 4
    """Batches per evaluation."""
    log_every: int = 1
    """Metrics every N steps."""
    resume: Resume = Resume.AUTO
    """auto (continue from the latest checkpoint) | never."""
    max_requeues: int = 3
    """Slurm: requeue after preemption while SLURM_RESTART_COUNT is below this."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept under checkpoints/ (older ones are deleted after a save)."""
    device: Device = Device.AUTO
    """auto (cuda if present, else cpu/gloo) | cpu | cuda."""
    launcher: Launcher = Launcher.AUTO
    """auto (from the plan) | torchrun | deepspeed."""
    report_to: tuple[str, ...] | None = None
    """Experiment trackers fed by rank 0 each step: tensorboard, wandb, mlflow (runtime/trackers.py);
    unset: none (metrics.jsonl only)."""
    bind_cpu_cores: bool = True
    """CPU runs on one node: bind each rank to its own block of cores (runtime/dist.py
    cpu_cores_for_rank; DeepSpeed's --bind_cores_to_rank; 1-3% faster steps measured). No effect on
    CUDA or across nodes; turn off when several runs share one machine's cores."""
    memory_trace: bool = False
    """Record PyTorch's MemTracker peak of live tensors per phase (forward / backward / optimizer) on
    the measured step and print it against the plan (memory_rank{R}.json, logs/memory_table.txt).
    Off by default: it slows that step down several times."""
    oversubscribe: bool = False
    """CPU runs: allow more ranks than this machine has CPU cores (the preflight refuses that by default:
    oversubscribed gloo ranks are several times slower and can time out). For tests and demos of a mesh
    on a small machine (4 ranks on 2 cores); never needed on GPUs."""
    export: Export = Export.ADAPTER
    """LoRA runs: what final/ holds. adapter (the peft adapter, PeftModel.from_pretrained) | merged (full
    weights with the adapter merged in, AutoModelForCausalLM.from_pretrained; as large as the base model) |
    both (adapter in final/, merged weights in final/merged/). QLoRA: adapter only (merging into 4-bit
    NF4 weights would round the sum back to 4 bits). No effect with train.method full."""


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict:
        def conv(v):
            if isinstance(v, enum.Enum):
                return v.value
            if isinstance(v, tuple):
                return list(v)
            return v
        return {s.name: {f.name: conv(getattr(getattr(self, s.name), f.name))
                         for f in dataclasses.fields(getattr(self, s.name))}
                for s in dataclasses.fields(self)}


_SECTIONS = typing.get_type_hints(RunConfig)
_HINTS_CACHE: dict[type, dict] = {}


def _hints(cls: type) -> dict:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return _HINTS_CACHE[cls]


# Value constraints: key -> (predicate, message fragment saying what is allowed).
_CHECKS = {
    "hardware.nodes": (lambda v: v >= 1, "must be >= 1"),
    "run.report_to": (lambda v: v is None or set(v) <= {"tensorboard", "wandb", "mlflow"},
                      "must list trackers from: tensorboard, wandb, mlflow"),
    "hardware.gpus_per_node": (lambda v: v >= 1, "must be >= 1"),
    "train.seq_len": (lambda v: v >= 1, "must be >= 1, e.g. 4096"),
    "train.micro_batch": (lambda v: v is None or v >= 1, "must be auto or >= 1"),
    "train.global_batch": (lambda v: v >= 1, "must be >= 1"),
    "train.selective_every": (lambda v: v >= 1, "must be >= 1"),
    "train.loss_chunk_tokens": (lambda v: v >= 1, "must be >= 1, e.g. 512"),
    "train.tiled_mlp": (lambda v: v is None or v >= 1, "must be auto, off or a number of tiles >= 2, e.g. 8 "
                                                       "(1 is off)"),
    "train.headroom": (lambda v: 0 <= v < 0.9, "must be a fraction in [0, 0.9), e.g. 0.05"),
    "train.lr": (lambda v: v is Auto.AUTO or v > 0, "must be auto or > 0, e.g. 2e-4"),
    "train.steps": (lambda v: v >= 1, "must be >= 1"),
    "train.warmup_steps": (lambda v: v >= 0, "must be >= 0"),
    "train.grad_clip": (lambda v: v >= 0, "must be >= 0 (0 disables)"),
    "train.max_nonfinite_steps": (lambda v: v >= 1, "must be >= 1, e.g. 10"),
    "lora.rank": (lambda v: v >= 1, "must be >= 1, e.g. 16"),
    **{f"parallel.{k}": (lambda v: v is None or v >= 1, "must be auto or an integer >= 1, e.g. 2")
       for k in ("dp_replicate", "dp_shard", "tp", "cp")},
    "lora.dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "data.eval_fraction": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "run.checkpoint_every": (lambda v: v >= 0, "must be >= 0"),
    "run.keep_checkpoints": (lambda v: v >= 1, "must be >= 1 (complete checkpoints kept), e.g. 3"),
    "run.eval_every": (lambda v: v >= 0, "must be >= 0"),
}


def _build_section(name: str, cls: type, raw: dict) -> object:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = _hints(cls)
    kwargs = {}
    for k, v in raw.items():
        key = f"{name}.{k}"
        if k not in hints:
            raise ConfigError(f"unknown key '{key}'{nearest(str(k), hints)}")
        value = coerce(key, hints[k], v)
        check = _CHECKS.get(key)
        if check and value is not None and not check[0](value):
            raise ConfigError(f"{key}: {v!r} {check[1]}")
        kwargs[k] = value
    return cls(**kwargs)


def set_dotted(raw: dict, dotted: str, value) -> None:
    """Apply one override `section.key=value` to a raw (unvalidated) config mapping."""
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"override '{dotted}': write section.key=value, e.g. train.seq_len=2048")
    section, key = parts
    if section not in _SECTIONS:
        raise ConfigError(f"unknown section '{section}'{nearest(section, _SECTIONS)}")
    raw.setdefault(section, {})
    if not isinstance(raw[section], dict):
        raise ConfigError(f"{section}: expected a mapping")
    raw[section][key] = value


def parse_run_config(raw: dict | None, overrides: dict[str, object] | None = None) -> RunConfig:
    """Validate a raw mapping (from YAML) plus dotted overrides into a RunConfig."""
    raw = dict(raw or {})
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    sections = {}
    for name, value in raw.items():
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section '{name}'{nearest(str(name), _SECTIONS)}")
        sections[name] = _build_section(name, _SECTIONS[name], value or {})
    cfg = RunConfig(**sections)
    m = cfg.model
    if m.name is None and m.params is None:
        raise ConfigError("model: set model.name (a preset, config.json or checkpoint dir) or model.params (e.g. 7.5e9)")
    if m.name is not None and m.params is not None:
        raise ConfigError("model: set either model.name or model.params, not both")
    if cfg.train.method is Method.QLORA and cfg.train.precision is Precision.FP32:
        raise ConfigError("train.method: qlora computes in 16-bit; set train.precision: bf16")
    if cfg.train.method is Method.QLORA and cfg.run.export is not Export.ADAPTER:
        raise ConfigError(f"run.export: {cfg.run.export.value} with train.method qlora: merging into the 4-bit NF4 "
                          "base would round the merged weights back to 4 bits; set run.export: adapter and merge "
                          "onto the 16-bit base afterwards (PeftModel.from_pretrained(base, 'final').merge_and_unload())")
    if cfg.train.lr is Auto.AUTO:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=default_lr(cfg.train.method)))
    from shardtrain.config.ignored import warn_ignored  # settings this run ignores: one line each (issue 22)
    warn_ignored(cfg)
    return cfg


#: train.lr: auto, by method. Full fine-tuning moves every weight: 1e-5 (this repo's
#: configs/examples/llama3-8b-full-8x80gb.yaml; LLaMA-Factory examples/train_full/llama3_full_sft.yaml
#: learning_rate 1.0e-5). LoRA/QLoRA train small zero-initialised adapters: 2e-4 (this repo's
#: llama3-8b-lora-1x24gb.yaml; axolotl examples/llama-3/lora-8b.yml and qlora.yml learning_rate 0.0002).
DEFAULT_LR = {Method.FULL: 1e-5, Method.LORA: 2e-4, Method.QLORA: 2e-4}


def default_lr(method: Method) -> float:
    """The learning rate `train.lr: auto` resolves to for ``method``."""
    return DEFAULT_LR[method]


def load_run_config(path: str | Path | None, overrides: dict[str, object] | None = None) -> RunConfig:
    """Read a YAML run config (yaml.safe_load) and validate it with overrides applied."""
    raw: dict = {}
    if path is not None:
        from shardtrain.config.safe_io import load_mapping  # any bad file -> one ConfigError (issue 13)
        raw = load_mapping(path, fmt="yaml", what="run config", empty_ok=True,
                           fix="write a YAML mapping of sections (model, hardware, train, ...), "
                               "e.g. configs/examples/tiny-cpu.yaml")
    return parse_run_config(raw, overrides)
