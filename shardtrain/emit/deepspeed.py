"""Plan -> DeepSpeed config dict. THE only module that spells DeepSpeed config keys.

Key names are those of DeepSpeed 0.19 (deepspeed/runtime/constants.py, runtime/zero/config.py,
runtime/zero/offload_config.py, runtime/precision_config.py, runtime/swap_tensor/constants.py);
tests/test_emit_deepspeed.py runs every emitted config through the installed DeepSpeed's own parser
(emit/engine_schema.py), which reports any key it does not read. `verify` checks a config against the
plan and the accessors below read it, so the runtime and `shardtrain check` spell no key themselves.
Nothing here imports deepspeed: `shardtrain emit` runs on a login node without it.
"""
from __future__ import annotations

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import Engine, Method, OffloadDevice, Optimizer, Precision
# the mesh and the buffer sizes, re-exported: callers read them here with the keys
from shardtrain.emit.deepspeed_sizes import (AIO_ALIGN_ELEMENTS, NVME_MIN_BUFFER_ELEMENTS,  # noqa: F401
                                             DeepSpeedConfigError, batch_world, check_mesh, largest_param_elements,
                                             nvme_buffer_elements, nvme_param_buffer_count, sequence_parallel_size)

# ---------------------------------------------------------------- top-level keys
TRAIN_BATCH_SIZE = "train_batch_size"
MICRO_BATCH = "train_micro_batch_size_per_gpu"
GRAD_ACCUM = "gradient_accumulation_steps"
GRADIENT_CLIPPING = "gradient_clipping"
ZERO = "zero_optimization"
BF16, FP16 = "bf16", "fp16"
OPTIMIZER, SCHEDULER, TYPE, PARAMS = "optimizer", "scheduler", "type", "params"
ALLOW_UNTESTED_OPTIMIZER = "zero_allow_untested_optimizer"
FORCE_DS_CPU_OPTIMIZER = "zero_force_ds_cpu_optimizer"
AIO = "aio"
STEPS_PER_PRINT = "steps_per_print"
WALL_CLOCK_BREAKDOWN = "wall_clock_breakdown"
SEQUENCE_PARALLEL_SIZE = "sequence_parallel_size"
"""Ulysses sequence parallel degree (DeepSpeed 0.19 runtime/config.py DeepSpeedConfig.__init__ reads it
from the dict: without an mpu its batch arithmetic divides the world by it; ALST's
UlyssesSPAttentionHF.register_with_transformers builds the groups)."""
TENSOR_PARALLEL, AUTOTP_SIZE = "tensor_parallel", "autotp_size"
"""AutoTP training (runtime/tensor_parallel/config.py TPTrainingConfig.autotp_size; 0 = off)."""
# zero_optimization
STAGE, OVERLAP_COMM, CONTIGUOUS_GRADIENTS = "stage", "overlap_comm", "contiguous_gradients"
REDUCE_SCATTER, REDUCE_BUCKET, ALLGATHER_BUCKET = "reduce_scatter", "reduce_bucket_size", "allgather_bucket_size"
ALLGATHER_PARTITIONS, SUB_GROUP_SIZE = "allgather_partitions", "sub_group_size"
PREFETCH_BUCKET = "stage3_prefetch_bucket_size"
PERSISTENCE_THRESHOLD = "stage3_param_persistence_threshold"
MAX_LIVE_PARAMETERS, MAX_REUSE_DISTANCE = "stage3_max_live_parameters", "stage3_max_reuse_distance"
GATHER_16BIT_ON_SAVE = "stage3_gather_16bit_weights_on_model_save"
STAGE3_PREFIX = "stage3_"
"""zero_optimization keys read only at stage 3 (runtime/zero/config.py)."""
OFFLOAD_OPTIMIZER, OFFLOAD_PARAM = "offload_optimizer", "offload_param"
# offload blocks
DEVICE, NVME_PATH, PIN_MEMORY = "device", "nvme_path", "pin_memory"
BUFFER_COUNT, BUFFER_SIZE, MAX_IN_CPU = "buffer_count", "buffer_size", "max_in_cpu"
PIPELINE_READ, PIPELINE_WRITE, FAST_INIT = "pipeline_read", "pipeline_write", "fast_init"
# precision blocks
ENABLED, LOSS_SCALE, INITIAL_SCALE_POWER = "enabled", "loss_scale", "initial_scale_power"
LOSS_SCALE_WINDOW, HYSTERESIS, MIN_LOSS_SCALE = "loss_scale_window", "hysteresis", "min_loss_scale"
# aio block
AIO_BLOCK_SIZE, AIO_QUEUE_DEPTH, AIO_INTRA_OP = "block_size", "queue_depth", "intra_op_parallelism"
AIO_SINGLE_SUBMIT, AIO_OVERLAP_EVENTS, AIO_USE_GDS = "single_submit", "overlap_events", "use_gds"
TORCH_ADAM, FUSED = "torch_adam", "fused"
MAX_GRAD_NORM = "max_grad_norm"
"""An optimizer param DeepSpeed refuses (engine.py _configure_basic_optimizer): clipping is GRADIENT_CLIPPING."""
AUTO = "auto"

#: Dotted keys the HF Trainer fills itself (transformers/integrations/deepspeed.py,
#: HfTrainerDeepSpeedConfig.trainer_config_process / _finalize): the only places "auto" may appear.
TRAINER_AUTO_KEYS = frozenset({
    TRAIN_BATCH_SIZE, MICRO_BATCH, GRAD_ACCUM, GRADIENT_CLIPPING, f"{FP16}.{ENABLED}", f"{BF16}.{ENABLED}",
    f"{OPTIMIZER}.{PARAMS}.lr", f"{OPTIMIZER}.{PARAMS}.betas", f"{OPTIMIZER}.{PARAMS}.eps",
    f"{OPTIMIZER}.{PARAMS}.weight_decay", f"{SCHEDULER}.{PARAMS}.warmup_min_lr",
    f"{SCHEDULER}.{PARAMS}.warmup_max_lr", f"{SCHEDULER}.{PARAMS}.warmup_num_steps",
    f"{SCHEDULER}.{PARAMS}.total_num_steps", f"{ZERO}.{REDUCE_BUCKET}", f"{ZERO}.{PREFETCH_BUCKET}",
    f"{ZERO}.{PERSISTENCE_THRESHOLD}"})

#: What accelerate's Accelerator._prepare_deepspeed fills for "auto" (not betas/eps).
ACCELERATE_AUTO_KEYS = TRAINER_AUTO_KEYS - {f"{OPTIMIZER}.{PARAMS}.betas", f"{OPTIMIZER}.{PARAMS}.eps"}

#: Optimizer -> DeepSpeed "optimizer.type" (engine.py _configure_basic_optimizer: AdamW/Lion are
#: DeepSpeed's own, others resolve as getattr(torch.optim, type)); None = client optimizer.
DS_OPTIMIZER_TYPE = {Optimizer.ADAMW: "AdamW", Optimizer.LION: "Lion", Optimizer.SGD: "SGD",
                     Optimizer.ADAFACTOR: "Adafactor", Optimizer.ADAMW8BIT: None}
#: Optimizers DeepSpeed must be handed by the caller (deepspeed.initialize(optimizer=...)).
CLIENT_OPTIMIZER = {Optimizer.ADAMW8BIT: "bitsandbytes.optim.AdamW8bit"}
#: Types in deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS (others need allow_untested).
_ZERO_SUPPORTED = {Optimizer.ADAMW, Optimizer.LION}
#: Optimizers with a DeepSpeed CPU implementation (DeepSpeedCPUAdam / DeepSpeedCPULion).
_DS_CPU = {Optimizer.ADAMW, Optimizer.LION}
_OPT_KEYS = {Optimizer.ADAMW: ("lr", "betas", "eps", "weight_decay"), Optimizer.LION: ("lr", "betas", "weight_decay"),
             Optimizer.SGD: ("lr", "weight_decay"), Optimizer.ADAFACTOR: ("lr", "weight_decay")}

_TRAINER_FILLED = ("lr", "weight_decay")
OPTIMIZER_BETAS = {Optimizer.ADAMW: (0.9, 0.999), Optimizer.LION: (0.9, 0.99)}
"""betas the emitted optimizer block uses: torch AdamW's default; Lion's paper default (Chen et al. 2023)."""
ADAM_EPS = 1e-8

AIO_BLOCK_BYTES = 1 << 20
"""aio block_size: DeepSpeed's default 1 MiB (swap_tensor/constants.py)."""
AIO_QUEUE_DEPTH_DEFAULT = 8
def client_optimizer(plan: Plan) -> str | None:
    """Dotted class the runtime must build and pass to deepspeed.initialize, or None when the
    config's own optimizer block builds it."""
    return CLIENT_OPTIMIZER.get(plan.chosen.optimizer)


def _check_legal(plan: Plan, nvme_path: str | None) -> None:
    c, s = plan.chosen, plan.chosen.strategy
    if s.engine is not Engine.DEEPSPEED:
        raise DeepSpeedConfigError("strategy", s.value, f"the plan uses {s.engine.value}, not DeepSpeed",
                                   "use the fsdp/torchrun outputs, or force a zero* strategy (--strategy zero3)")
    check_mesh(plan)
    off = s.offload_optimizer
    if off is not OffloadDevice.NONE and c.optimizer not in _DS_CPU:
        name = "8-bit AdamW" if c.optimizer is Optimizer.ADAMW8BIT else c.optimizer.value
        raise DeepSpeedConfigError(
            "optimizer", c.optimizer.value,
            f"{name} cannot run with ZeRO-Offload ({s.value}): DeepSpeed only runs DeepSpeedCPUAdam/"
            "DeepSpeedCPULion on the host (zero_force_ds_cpu_optimizer) and there is no 8-bit CPU Adam",
            "set optimizer: adamw (DeepSpeedCPUAdam) or a strategy without offload (zero2, zero3)")
    if OffloadDevice.NVME in (off, s.offload_params):
        if c.optimizer is not Optimizer.ADAMW:
            raise DeepSpeedConfigError("optimizer", c.optimizer.value, "ZeRO-Infinity swaps only Adam states",
                                       "set optimizer: adamw")
        if not (nvme_path or plan.hardware.nvme_path):
            raise DeepSpeedConfigError("hardware.nvme_path", None, f"{s.value} offloads to NVMe but no path is set",
                                       "set hardware.nvme_path (--nvme-path) to a local NVMe directory")
    if c.method is Method.QLORA and s.offload_params is not OffloadDevice.NONE:
        raise DeepSpeedConfigError("strategy", s.value, "QLoRA's 4-bit weights cannot be offloaded by ZeRO-3",
                                   "use zero3 or zero2_offload")


def _optimizer_block(plan: Plan, trainer: bool, lr: float, weight_decay: float, betas, eps: float) -> dict | None:
    opt, s = plan.chosen.optimizer, plan.chosen.strategy
    typ = DS_OPTIMIZER_TYPE[opt]
    if typ is None:
        return None
    values = {"lr": lr, "betas": list(betas if opt is Optimizer.ADAMW else OPTIMIZER_BETAS.get(opt, betas)), "eps": eps,
              "weight_decay": weight_decay}
    # Trainer flavour: "auto" only for what the Trainer AND accelerate both fill (lr, weight_decay:
    # TrainingArguments / DummyOptim). betas/eps stay explicit: accelerate leaves "auto" betas for
    # DeepSpeed to choke on, and the Trainer checks them against adam_beta1/2, adam_epsilon
    # (trainer_arguments sets those to these values).
    params = {k: (AUTO if trainer and k in _TRAINER_FILLED else values[k]) for k in _OPT_KEYS[opt]}
    if opt is Optimizer.SGD:
        params["momentum"] = 0.9  # the memory model counts one momentum buffer
    if opt is Optimizer.ADAMW and s.offload_optimizer is OffloadDevice.NONE:
        # torch.optim.AdamW instead of FusedAdam: no JIT build of fused_adam (needs nvcc), ZeRO-supported.
        # `fused` is passed through to it (engine.py get_optimizer_configuration pops only torch_adam,
        # adam_w_mode and foreach): torch's fused kernel, in place over the flat fp32 partition, so no
        # temporaries (foreach would allocate 4 B/param, the for-loop 8 B/param; compiler/phases.py).
        params[TORCH_ADAM] = True
        params[FUSED] = True
    return {TYPE: typ, PARAMS: params}


def _precision_blocks(p: Precision) -> dict:
    if p is Precision.BF16_PURE:   # planner.illegal_reason refuses it; a hand-edited plan.json must not emit fp32
        raise ValueError("train.precision bf16_pure: not planned for DeepSpeed; use a DDP/FSDP2 strategy or "
                         "precision: bf16")
    if p is Precision.BF16:
        return {BF16: {ENABLED: True}}
    if p is Precision.FP16:
        return {FP16: {ENABLED: True, LOSS_SCALE: 0, INITIAL_SCALE_POWER: 16, LOSS_SCALE_WINDOW: 1000,
                       HYSTERESIS: 2, MIN_LOSS_SCALE: 1}}
    return {}


def _zero_block(plan: Plan, nvme_path: str | None) -> dict:
    s, b = plan.chosen.strategy, plan.zero_buckets
    z: dict = {STAGE: s.zero_stage, OVERLAP_COMM: True, CONTIGUOUS_GRADIENTS: True,
               REDUCE_BUCKET: b.reduce_bucket_elements}
    if s.zero_stage < 3:
        z.update({REDUCE_SCATTER: True, ALLGATHER_PARTITIONS: True, ALLGATHER_BUCKET: b.allgather_bucket_elements})
    else:
        z.update({PREFETCH_BUCKET: b.prefetch_bucket_elements, PERSISTENCE_THRESHOLD: b.param_persistence_threshold,
                  MAX_LIVE_PARAMETERS: b.max_live_parameters, MAX_REUSE_DISTANCE: b.max_reuse_distance,
                  GATHER_16BIT_ON_SAVE: True})
    path = nvme_path or plan.hardware.nvme_path
    if s.offload_optimizer is OffloadDevice.CPU:
        z[OFFLOAD_OPTIMIZER] = {DEVICE: "cpu", PIN_MEMORY: True}
    elif s.offload_optimizer is OffloadDevice.NVME:
        # buffer_count >= Adam's 4 swapped tensors (param, grad, m, v): offload_config.py docstring.
        z[OFFLOAD_OPTIMIZER] = {DEVICE: "nvme", NVME_PATH: path, PIN_MEMORY: True, BUFFER_COUNT: 4,
                                PIPELINE_READ: False, PIPELINE_WRITE: False, FAST_INIT: False}
    if s.offload_params is OffloadDevice.CPU:
        z[OFFLOAD_PARAM] = {DEVICE: "cpu", PIN_MEMORY: True}
    elif s.offload_params is OffloadDevice.NVME:
        n = nvme_buffer_elements(plan)
        z[OFFLOAD_PARAM] = {DEVICE: "nvme", NVME_PATH: path, PIN_MEMORY: True,
                            BUFFER_COUNT: nvme_param_buffer_count(plan), BUFFER_SIZE: n, MAX_IN_CPU: 10**9}
        z[SUB_GROUP_SIZE] = n
    return z


def deepspeed_config(plan: Plan, *, trainer: bool = False, grad_clip: float = 1.0, lr: float | None = None,
                     weight_decay: float = 0.0, nvme_path: str | None = None,
                     betas: tuple[float, float] = OPTIMIZER_BETAS[Optimizer.ADAMW], eps: float = ADAM_EPS) -> dict:
    """The DeepSpeed config for the plan's chosen candidate.

    Batch keys satisfy DeepSpeed's own train_batch_size == micro × accumulation × :func:`batch_world` (the
    data-parallel size dp, times tp for AutoTP). A mesh adds sequence_parallel_size (cp, Ulysses) and
    tensor_parallel.autotp_size (tp, ZeRO-1/2). With
    ``trainer=True`` (for ``TrainingArguments(deepspeed=...)`` and accelerate) lr, weight decay and
    gradient clipping are "auto" (the Trainer fills them from its arguments, accelerate from DummyOptim);
    batch sizes, precision and betas/eps stay explicit so the Trainer raises a mismatch error if its
    arguments differ from the plan (see :func:`trainer_arguments`). ``lr`` None: the method's default
    (config/schema.py default_lr), as `train.lr: auto` resolves. When :func:`client_optimizer` is not None the config has
    no optimizer block and the caller passes that optimizer to ``deepspeed.initialize``.
    Raises :class:`DeepSpeedConfigError` for combinations DeepSpeed cannot run.
    """
    _check_legal(plan, nvme_path)
    c, s = plan.chosen, plan.chosen.strategy
    if lr is None:
        from shardtrain.config.schema import default_lr
        lr = default_lr(c.method)
    if grad_clip < 0:
        raise DeepSpeedConfigError("train.grad_clip", grad_clip, "must be >= 0", "use 1.0, or 0 to disable")
    cfg: dict = {TRAIN_BATCH_SIZE: c.micro_batch_size * c.grad_accum_steps * batch_world(plan),
                 MICRO_BATCH: c.micro_batch_size, GRAD_ACCUM: c.grad_accum_steps,
                 GRADIENT_CLIPPING: AUTO if trainer else float(grad_clip)}
    if plan.parallel.cp > 1:
        cfg[SEQUENCE_PARALLEL_SIZE] = sequence_parallel_size(plan)
        if trainer:
            # transformers 5.23 HfTrainerDeepSpeedConfig.trainer_config_process checks train_batch_size against
            # world × micro × accumulation (no division by sp), DeepSpeed asserts micro × accumulation ×
            # world / sp: no number passes both. Absent, the Trainer checks nothing (fill_match skips a missing
            # key) and DeepSpeed derives it from the two explicit keys (_set_batch_related_parameters).
            del cfg[TRAIN_BATCH_SIZE]
    if plan.parallel.tp > 1:
        cfg[TENSOR_PARALLEL] = {AUTOTP_SIZE: plan.parallel.tp}
    cfg.update(_precision_blocks(c.precision))
    cfg[ZERO] = _zero_block(plan, nvme_path)
    opt = _optimizer_block(plan, trainer, lr, weight_decay, betas, eps)
    if opt is not None:
        cfg[OPTIMIZER] = opt
    if c.optimizer not in _ZERO_SUPPORTED:
        cfg[ALLOW_UNTESTED_OPTIMIZER] = True  # engine.py _do_optimizer_sanity_check asserts otherwise
    if OffloadDevice.NVME in (s.offload_optimizer, s.offload_params):
        cfg[AIO] = {AIO_BLOCK_SIZE: AIO_BLOCK_BYTES, AIO_QUEUE_DEPTH: AIO_QUEUE_DEPTH_DEFAULT, AIO_INTRA_OP: 1,
                    AIO_SINGLE_SUBMIT: False, AIO_OVERLAP_EVENTS: True, AIO_USE_GDS: False}
    cfg[STEPS_PER_PRINT] = 2**31 - 1  # our runtime logs metrics itself
    cfg[WALL_CLOCK_BREAKDOWN] = False
    return cfg


def trainer_arguments(plan: Plan, *, lr: float | None = None, weight_decay: float | None = None,
                      grad_clip: float | None = None) -> dict:
    """``TrainingArguments`` keyword arguments matching :func:`deepspeed_config` with ``trainer=True``
    (emit/trainer.py; kept here for callers of the old name)."""
    from shardtrain.emit.trainer import trainer_arguments as args_for
    return args_for(plan, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip)


# ---------------------------------------------------------------- reading a config (check, runtime facts)
def zero_stage(ds: dict) -> int:
    """zero_optimization.stage (0 when absent, as DeepSpeed's default)."""
    z = ds.get(ZERO) or {}
    return z.get(STAGE, 0) if isinstance(z, dict) else 0


def mesh_sizes(ds: dict) -> dict[str, object]:
    """{sequence_parallel_size, autotp_size: value or None} as written (None when absent)."""
    tp = ds.get(TENSOR_PARALLEL)
    return {SEQUENCE_PARALLEL_SIZE: ds.get(SEQUENCE_PARALLEL_SIZE),
            AUTOTP_SIZE: tp.get(AUTOTP_SIZE) if isinstance(tp, dict) else None}


def config_batch_world(ds: dict, world_size: int) -> float:
    """The world DeepSpeed's batch assertion uses for this config on `world_size` processes (no mpu):
    world / sequence_parallel_size (runtime/config.py DeepSpeedConfig.__init__), a float as there."""
    sp = ds.get(SEQUENCE_PARALLEL_SIZE)
    return world_size / sp if isinstance(sp, int) and not isinstance(sp, bool) and sp > 0 else world_size


def batch_sizes(ds: dict) -> dict[str, object]:
    """{train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps: value or None}."""
    return {k: ds.get(k) for k in (TRAIN_BATCH_SIZE, MICRO_BATCH, GRAD_ACCUM)}


def verify(ds: dict, plan: Plan) -> list[str]:
    """Where a DeepSpeed config disagrees with the plan it is run with: batch sizes (DeepSpeed asserts
    train_batch_size == micro × accumulation × batch_world, and the loop samples the plan's batches), the
    mesh keys (sequence_parallel_size, tensor_parallel.autotp_size) and the ZeRO stage. One line per
    problem, naming the key, both values and the fix; [] when it agrees."""
    c = plan.chosen
    want = {MICRO_BATCH: c.micro_batch_size, GRAD_ACCUM: c.grad_accum_steps,
            TRAIN_BATCH_SIZE: c.micro_batch_size * c.grad_accum_steps * batch_world(plan)}
    out = [f"ds_config.json: {k}={v} but the plan has {want[k]}; re-emit the config from plan.json"
           for k, v in batch_sizes(ds).items() if v is not None and int(v) != want[k]]
    mesh_want = {SEQUENCE_PARALLEL_SIZE: plan.parallel.cp, AUTOTP_SIZE: plan.parallel.tp}
    for k, v in mesh_sizes(ds).items():
        have = 1 if v in (None, 0) else v
        if have != mesh_want[k]:
            out.append(f"ds_config.json: {k}={v} but the plan's mesh is {plan.parallel.label()} (wants "
                       f"{mesh_want[k]}); re-emit the config from plan.json")
    if zero_stage(ds) != c.strategy.zero_stage:
        out.append(f"ds_config.json: {ZERO}.{STAGE}={zero_stage(ds)} but the plan is {c.strategy.value}; "
                   "re-emit the config from plan.json")
    return out


def cpu_config(ds: dict, plan: Plan) -> dict | None:
    """The config for a CPU-only host when DeepSpeed's own optimizer would be a CUDA kernel: its "Lion"
    is FusedLion (ops/lion), so without offload the runtime passes its own Lion as a client optimizer
    (engine.py _configure_basic_optimizer); None when the config runs on CPU as it is."""
    s = plan.chosen.strategy
    opt = ds.get(OPTIMIZER) or {}
    if s.offload_optimizer is not OffloadDevice.NONE or str(opt.get(TYPE, "")).lower() != "lion":
        return None
    out = {k: v for k, v in ds.items() if k != OPTIMIZER}
    out[ALLOW_UNTESTED_OPTIMIZER] = True  # a client optimizer outside ZERO_SUPPORTED_OPTIMIZERS
    return out
