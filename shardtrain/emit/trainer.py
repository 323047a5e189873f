"""Plan -> what the user's OWN script reads (HF Trainer / TRL, accelerate, peft, bitsandbytes). Pure, no torch.

- trainer_deepspeed_config(plan, cfg)  hf_ds_config.json: the DeepSpeed JSON for TrainingArguments(deepspeed=...)
                                       and accelerate's deepspeed_config_file ("auto" where both fill values)
- trainer_arguments(plan, lr=...)      the TrainingArguments keys the plan decided (batch, precision,
                                       checkpointing, optimizer, loss)
- training_arguments(plan, cfg, ...)   trainer_args.json: those plus the run config's hyper-parameters and the
                                       engine (deepspeed path, or fsdp + fsdp_config)
- lora_config(plan) / bnb_config(plan) peft LoraConfig / transformers BitsAndBytesConfig keyword arguments
- parallelism_config(plan)             accelerate ParallelismConfig keyword arguments for the plan's mesh (None
                                       for a 1-D mesh): TrainingArguments(parallelism_config=...) takes the object,
                                       not a dict (training_args.py), so trainer_args.json cannot carry it; the
                                       README says how to build it, accelerate.yaml carries it as
                                       parallelism_config_* keys (emit/accelerate.py)

Key names are transformers 5's (training_args.py: activation_checkpointing* replaced the deprecated
gradient_checkpointing* aliases; fsdp_config keys without the fsdp_ prefix, _process_fsdp_args).
tests/test_emit_bundle_hf.py feeds every output to the real classes: TrainingArguments (then
HfTrainerDeepSpeedConfig.trainer_config_process/finalize and DeepSpeed's parser on the filled config),
accelerate's FullyShardedDataParallelPlugin, peft's LoraConfig and BitsAndBytesConfig.
"""
from __future__ import annotations

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import CpMode, Engine, GradCkpt, Method, Optimizer, Precision
from shardtrain.emit import deepspeed as K
from shardtrain.emit.fsdp import DTYPE_NAME, fsdp_settings, hf_checkpoint_every

HF_DS_CONFIG_JSON = "hf_ds_config.json"
"""The Trainer/accelerate-facing DeepSpeed JSON (ds_config.json is our worker's: explicit lr, no "auto")."""
TRAINER_ARGS_JSON = "trainer_args.json"
LORA_CONFIG_JSON = "lora_config.json"
BNB_CONFIG_JSON = "bnb_config.json"
#: Optimizer -> TrainingArguments.optim (transformers training_args.py OptimizerNames) where the Trainer, not a
#: DeepSpeed optimizer block, builds it; AdamW is the Trainer's default (adamw_torch_fused).
TRAINER_OPTIM = {Optimizer.ADAMW8BIT: "adamw_bnb_8bit", Optimizer.LION: "lion_32bit", Optimizer.SGD: "sgd",
                 Optimizer.ADAFACTOR: "adafactor"}


def hyper_parameters(plan: Plan, cfg=None) -> dict:
    """lr, weight decay, clipping, warmup, schedule floor and seed: the run config's, or its defaults (lr:
    the method's default, config/schema.py default_lr, as `train.lr: auto` resolves)."""
    from shardtrain.config.schema import TrainConfig, default_lr
    t = cfg.train if cfg is not None else TrainConfig()
    lr = t.lr if isinstance(t.lr, (int, float)) else default_lr(plan.chosen.method)
    return {"lr": float(lr), "weight_decay": t.weight_decay, "grad_clip": t.grad_clip, "warmup_steps": t.warmup_steps,
            "min_lr_ratio": t.min_lr_ratio, "seed": t.seed}


def ds_kwargs(plan: Plan, cfg=None) -> dict:
    """deepspeed_config() keyword arguments from the run config (both DeepSpeed JSONs use the same numbers)."""
    h = hyper_parameters(plan, cfg)
    kw = {"grad_clip": h["grad_clip"], "lr": h["lr"], "weight_decay": h["weight_decay"]}
    if cfg is not None:
        kw["nvme_path"] = cfg.hardware.nvme_path
    return kw


def trainer_deepspeed_config(plan: Plan, cfg=None) -> dict:
    """The DeepSpeed JSON for the HF Trainer and accelerate (hf_ds_config.json): lr, weight decay and clipping
    "auto" (TrainingArguments / DummyOptim fill them, so any learning_rate passes HfTrainerDeepSpeedConfig);
    batch sizes, precision and ZeRO/offload settings explicit (the fit depends on them: a Trainer whose
    arguments differ raises its own mismatch error)."""
    return K.deepspeed_config(plan, trainer=True, **ds_kwargs(plan, cfg))


def trainer_arguments(plan: Plan, *, lr: float | None = None, weight_decay: float | None = None,
                      grad_clip: float | None = None) -> dict:
    """``TrainingArguments`` keyword arguments for the plan's decisions, matching
    :func:`trainer_deepspeed_config`: batch sizes, precision and betas/eps equal its explicit values."""
    c = plan.chosen
    ck = c.gradient_checkpointing
    kw: dict = {"per_device_train_batch_size": c.micro_batch_size, "gradient_accumulation_steps": c.grad_accum_steps,
                # pure bf16: neither flag (the script loads the model in bf16): bf16=True would make accelerate
                # upcast trainable params to fp32 under FSDP2 (fsdp_utils.fsdp2_prepare_model) and autocast
                "bf16": c.precision is Precision.BF16, "fp16": c.precision is Precision.FP16,
                "activation_checkpointing": hf_checkpoint_every(plan) > 0}
    if kw["activation_checkpointing"]:
        # use_reentrant False: works with frozen (LoRA) params; every_n_layers/offload are popped by the
        # Trainer (trainer.py) and passed to model.activation_checkpointing_enable
        kw["activation_checkpointing_kwargs"] = {"use_reentrant": False}
        if ck is GradCkpt.SELECTIVE:
            kw["activation_checkpointing_kwargs"]["every_n_layers"] = plan.train.selective_every
        if c.activation_offload.value == "cpu":
            kw["activation_checkpointing_kwargs"]["offload"] = True
    betas = K.OPTIMIZER_BETAS.get(c.optimizer)
    if betas:  # a DeepSpeed optimizer block has them too: the Trainer compares them with adam_beta1/2
        kw["adam_beta1"], kw["adam_beta2"] = betas
        if c.optimizer is Optimizer.ADAMW:
            kw["adam_epsilon"] = K.ADAM_EPS
    ds_block = c.strategy.engine is Engine.DEEPSPEED and K.client_optimizer(plan) is None
    if not ds_block and c.optimizer in TRAINER_OPTIM:
        kw["optim"] = TRAINER_OPTIM[c.optimizer]  # the Trainer builds the optimizer the plan counted
    if c.loss.value == "chunked":
        # the Trainer's way to never hold the full logits: Liger's fused linear cross-entropy
        # (transformers trainer.py apply_liger_kernel); nothing in the DeepSpeed JSON expresses it
        kw["use_liger_kernel"] = True
        kw["liger_kernel_config"] = {"fused_linear_cross_entropy": True, "cross_entropy": False, "rope": False,
                                     "swiglu": False, "rms_norm": False}
    for k, v in (("learning_rate", lr), ("weight_decay", weight_decay), ("max_grad_norm", grad_clip)):
        if v is not None:
            kw[k] = v
    return kw


def fsdp_trainer_config(plan: Plan) -> dict:
    """TrainingArguments.fsdp_config (FSDP2) with the plan's settings (the same as accelerate.yaml's fsdp_config)."""
    f = fsdp_settings(plan)
    return {"version": 2, "reshard_after_forward": f.reshard_after_forward, "cpu_offload": f.cpu_offload,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": [f.wrap_class],
            "state_dict_type": f.state_dict_type, "cpu_ram_efficient_loading": f.cpu_ram_efficient_loading,
            # FSDP's own checkpointing, not the training argument: the Trainer refuses both, and the
            # argument costs a redundant all-gather in backward (training_args.py _process_fsdp_args)
            "activation_checkpointing": f.activation_checkpointing != "none"}


def training_arguments(plan: Plan, cfg=None, *, ds_config_path: str = HF_DS_CONFIG_JSON) -> dict:
    """trainer_args.json: ``TrainingArguments(**this, output_dir=...)`` (or HfArgumentParser.parse_json_file)
    runs the plan: its decisions, the run config's hyper-parameters and schedule, and the engine."""
    h = hyper_parameters(plan, cfg)
    kw = trainer_arguments(plan, lr=h["lr"], weight_decay=h["weight_decay"], grad_clip=h["grad_clip"])
    # shardtrain's schedule (runtime/optim.py lr_at): linear warmup, cosine down to min_lr_ratio × lr
    kw.update({"warmup_steps": h["warmup_steps"], "lr_scheduler_type": "cosine_with_min_lr",
               "lr_scheduler_kwargs": {"min_lr_rate": h["min_lr_ratio"]}, "seed": h["seed"]})
    engine = plan.chosen.strategy.engine
    if engine is Engine.DEEPSPEED:
        kw["deepspeed"] = str(ds_config_path)
    elif engine is Engine.FSDP:
        kw["fsdp"] = True
        kw["fsdp_config"] = fsdp_trainer_config(plan)
        if kw["fsdp_config"]["activation_checkpointing"]:
            kw["activation_checkpointing"] = False
            kw.pop("activation_checkpointing_kwargs", None)
    return kw


def quant_storage_dtype(plan: Plan) -> str:
    """bnb_4bit_quant_storage: the sharded param dtype under FSDP / ZeRO-3 ("FSDP only supports sharding float
    data types": bitsandbytes docs/source/fsdp_qlora.md, which sets quant storage = torch_dtype = bfloat16;
    runtime/build.py does the same), uint8 (bitsandbytes' default) when parameters are not sharded."""
    c = plan.chosen
    return DTYPE_NAME[c.precision] if c.strategy.shards_params or c.strategy.engine is Engine.FSDP else "uint8"


def bnb_config(plan: Plan) -> dict | None:
    """BitsAndBytesConfig(**this) for QLoRA (NF4, double quantisation, compute in the plan's precision, as
    runtime/modeling.py quantize_4bit); None for other methods."""
    c = plan.chosen
    if c.method is not Method.QLORA:
        return None
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": DTYPE_NAME[c.precision], "bnb_4bit_quant_storage": quant_storage_dtype(plan)}


def lora_config(plan: Plan) -> dict | None:
    """peft LoraConfig(**this) with the rank/alpha/dropout/targets the plan counted; None for full fine-tuning."""
    if plan.chosen.method is Method.FULL:
        return None
    lo = plan.train.lora
    return {"r": lo.rank, "lora_alpha": lo.alpha, "lora_dropout": lo.dropout,
            "target_modules": list(plan.lora_targets or lo.targets), "bias": "none", "task_type": "CAUSAL_LM"}


def parallelism_config(plan: Plan) -> dict | None:
    """accelerate ParallelismConfig(**this) for the plan's mesh (accelerate 1.15 parallelism_config.py), or
    None when the mesh is data parallel over one dim (dp_shard only, or DDP's dp_replicate only), which
    accelerate's plain FSDP / DDP configs already express.

    FSDP2: dp_replicate_size × dp_shard_size × tp_size × cp_size as in the plan (accelerate shards over the
    flattened dp_shard_cp, as we do). accelerate's cp is torch's context_parallel (ring attention, CUDA SDPA
    only) whatever our cp_mode: a Ulysses plan holds the same seq/cp tokens per rank there, with ring
    communication (cp_comm_strategy: torch's rotate method, alltoall for Ulysses plans, allgather for ring).
    DeepSpeed: Ulysses is accelerate's sp (sp_backend deepspeed: ALST's UlyssesSPAttentionHF); tp is
    AutoTP, which accelerate reads from the DeepSpeed JSON (tensor_parallel.autotp_size), so not here; ZeRO
    partitions over every data-parallel rank, so no dp sizes either."""
    p, eng = plan.parallel, plan.chosen.strategy.engine
    if eng is Engine.DEEPSPEED:
        return {"sp_size": p.cp, "sp_backend": "deepspeed"} if p.cp > 1 else None
    if eng is not Engine.FSDP or (p.is_data_parallel_only and not p.is_hsdp):
        return None
    kw = {"dp_replicate_size": p.dp_replicate, "dp_shard_size": p.dp_shard, "tp_size": p.tp, "cp_size": p.cp}
    if p.cp > 1:
        kw["cp_backend"] = "torch"
    return kw


def cp_comm_strategy(plan: Plan) -> str:
    """torch context_parallel's rotate method accelerate passes on (TorchContextParallelConfig.cp_comm_strategy):
    allgather for a ring plan (torch's default), alltoall for a Ulysses plan (the closest torch has)."""
    return "allgather" if plan.parallel.cp_mode is CpMode.RING else "alltoall"
