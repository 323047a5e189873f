"""Plan -> `accelerate launch --config_file` YAML (accelerate 1.15 ClusterConfig keys).

- DeepSpeed plans: `distributed_type: DEEPSPEED` pointing at our generated ds_config.json
  (`deepspeed_config_file`). accelerate then forbids the duplicate keys it would otherwise take from
  the YAML (zero_stage, gradient_accumulation_steps, gradient_clipping, offload_*, zero3_save_16bit_model,
  and `mixed_precision`: "When using `deepspeed_config_file`, the following accelerate config variables
  will be ignored"), so those are left out; precision lives in the DeepSpeed JSON.
- FSDP plans: `distributed_type: FSDP`, `fsdp_version: 2`, keys as `accelerate config` writes them; a mesh
  that is not one dp_shard dim (HSDP, tp, cp) as the `parallelism_config` block (accelerate 1.15
  commands/launch.py `--parallelism_config_*` dests; utils/launch.py prepare_extend_env_parallelism_config
  exports them as PARALLELISM_CONFIG_* for ParallelismConfig). The old fsdp_hybrid_shard is that block with
  dp_replicate_size = nodes and dp_shard_size = GPUs per node (ParallelDims.for_strategy).
- DeepSpeed plans with a mesh: AutoTP is in the DeepSpeed JSON (tensor_parallel.autotp_size, which accelerate
  reads from it); Ulysses (sp) is NOT written here: accelerate 1.15 exports parallelism_config only on its
  FSDP/multi-GPU launch path (prepare_multi_gpu_env), not on the DeepSpeed one, so the script passes
  Accelerator(parallelism_config=ParallelismConfig(sp_size=..., sp_backend="deepspeed")) (a comment says so).
- DDP plans: MULTI_GPU (or NO for one process).
Multi-node: rdzv_backend c10d on main_process_ip:port, so one file serves every node (pass
`--machine_rank` per node; c10d ignores it for rank assignment).
"""
from __future__ import annotations

import yaml

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import CpMode, Engine, GradCkpt, Method, Precision
from shardtrain.emit.fsdp import fsdp_settings
from shardtrain.rundir_format import DS_CONFIG_JSON

# pure bf16 is "no": the script loads the model in bf16; any other value makes accelerate's FSDP2 upcast the
# trainable params to fp32 (accelerate/utils/fsdp_utils.py fsdp2_prepare_model) and autocast
_MIXED = {Precision.BF16: "bf16", Precision.FP16: "fp16", Precision.FP32: "no", Precision.BF16_PURE: "no"}
#: Keys accelerate refuses next to deepspeed_config_file (accelerate/utils/dataclasses.py
#: DeepSpeedPlugin._deepspeed_config_checks), as they appear in the YAML.
DS_FILE_CONFLICTS = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                     "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                     "zero3_save_16bit_model")


class AccelerateConfigError(ValueError):
    """A plan that needs more information to become an accelerate config."""


class AccelerateMeshError(AccelerateConfigError):
    """A mesh accelerate's ParallelismConfig refuses (the plan runs with `shardtrain launch`, not accelerate)."""


#: ParallelismConfig keyword -> accelerate.yaml key (commands/launch.py dests, config file's parallelism_config).
PARALLELISM_KEY_PREFIX = "parallelism_config_"


def _mesh_refusal(plan: Plan) -> str | None:
    """Why accelerate 1.15's ParallelismConfig / FSDP2 preparation refuses this mesh (parallelism_config.py
    __post_init__ and _validate_accelerator), or None."""
    p = plan.parallel
    if (p.tp > 1 or p.cp > 1) and p.dp_replicate > 1 and p.dp_shard == 1:
        return (f"parallel: {p.label()}: accelerate refuses tp/cp with dp_replicate > 1 and dp_shard 1 "
                "(ParallelismConfig: 'cannot be used with pure data parallelism'); fix: parallel.dp_shard > 1 "
                "(--dp-shard), or run it with `shardtrain launch`")
    if plan.chosen.strategy.engine is Engine.FSDP and p.fsdp_shard == 1 and p.world > 1:
        return (f"parallel: {p.label()}: accelerate's FSDP2 needs a dim to shard over (dp_shard or cp > 1); "
                "fix: parallel.dp_shard > 1 (--dp-shard), or strategy ddp for pure replication")
    return None


def parallelism_block(plan: Plan) -> dict | None:
    """accelerate.yaml's parallelism_config block (ParallelismConfig keyword arguments with the
    parallelism_config_ prefix) for an FSDP plan whose mesh is not one dp_shard dim; None otherwise."""
    from shardtrain.emit.trainer import cp_comm_strategy, parallelism_config
    kw = parallelism_config(plan) if plan.chosen.strategy.engine is Engine.FSDP else None
    if kw is None:
        return None
    out = {PARALLELISM_KEY_PREFIX + k: v for k, v in kw.items()}
    if plan.parallel.cp > 1:
        out[PARALLELISM_KEY_PREFIX + "cp_comm_strategy"] = cp_comm_strategy(plan)
    return out


def accelerate_config(plan: Plan, *, ds_config_path: str = DS_CONFIG_JSON, main_process_ip: str | None = None,
                      main_process_port: int = 29500, machine_rank: int = 0) -> dict:
    """The accelerate config dict (write it with :func:`render_yaml`)."""
    c, hw = plan.chosen, plan.hardware
    engine = c.strategy.engine
    refusal = _mesh_refusal(plan)
    if refusal:
        raise AccelerateMeshError(refusal)
    if hw.nodes > 1 and not main_process_ip:
        raise AccelerateConfigError(f"hardware.nodes: {hw.nodes}: a multi-node accelerate config needs the first "
                                    "node's address; pass --master-addr HOST (or --hosts h1,h2,...)")
    d: dict = {"compute_environment": "LOCAL_MACHINE", "debug": False, "num_machines": hw.nodes,
               "num_processes": c.world_size, "machine_rank": machine_rank, "gpu_ids": "all",
               "main_training_function": "main", "use_cpu": False, "downcast_bf16": "no",
               "enable_cpu_affinity": False}
    if hw.nodes > 1:
        d.update({"main_process_ip": main_process_ip, "main_process_port": int(main_process_port),
                  "rdzv_backend": "c10d", "same_network": False})
    else:
        d.update({"rdzv_backend": "static", "same_network": True})
    if engine is Engine.DEEPSPEED:
        d["distributed_type"] = "DEEPSPEED"
        ds = {"deepspeed_config_file": str(ds_config_path), "zero3_init_flag": c.strategy.zero_stage == 3}
        if hw.nodes > 1:
            ds["deepspeed_multinode_launcher"] = "standard"
        d["deepspeed_config"] = ds
        return d
    d["mixed_precision"] = _MIXED[c.precision]
    if engine is Engine.DDP:
        d["distributed_type"] = "MULTI_GPU" if c.world_size > 1 else "NO"
        return d
    f = fsdp_settings(plan)
    d["distributed_type"] = "FSDP"
    d["fsdp_config"] = {
        "fsdp_version": 2,
        "fsdp_reshard_after_forward": f.reshard_after_forward,
        "fsdp_offload_params": f.cpu_offload,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": f.wrap_class,
        "fsdp_state_dict_type": f.state_dict_type,
        "fsdp_cpu_ram_efficient_loading": f.cpu_ram_efficient_loading,
        # accelerate's launcher requires sync_module_states with cpu_ram_efficient_loading
        "fsdp_sync_module_states": f.cpu_ram_efficient_loading,
        # accelerate checkpoints every wrapped layer: selective (every k-th) becomes full (less memory)
        "fsdp_activation_checkpointing": f.activation_checkpointing != "none",
    }
    block = parallelism_block(plan)
    if block:
        d["parallelism_config"] = block
    return d


def notes(plan: Plan) -> list[str]:
    """Caveats printed as comments at the top of accelerate.yaml."""
    c = plan.chosen
    out = [f"generated by shardtrain for strategy {c.strategy.value}, world size {c.world_size}, "
           f"micro batch {c.micro_batch_size} x accumulation {c.grad_accum_steps}"]
    if c.strategy.engine is Engine.DEEPSPEED:
        out.append("precision, batch sizes, ZeRO and offload settings live in the DeepSpeed JSON; "
                   "do not add mixed_precision here (accelerate rejects it next to deepspeed_config_file)")
    else:
        out.append(f"use gradient_accumulation_steps={c.grad_accum_steps} in Accelerator(...) and a per-device "
                   f"batch size of {c.micro_batch_size}")
    if c.strategy.engine is Engine.FSDP:
        out.append("accelerate's FSDP2 MixedPrecisionPolicy reduces gradients in the compute dtype "
                   "(shardtrain's runtime reduces in fp32)")
        if c.gradient_checkpointing.value in ("selective", "op"):
            out.append(f"{c.gradient_checkpointing.value} checkpointing is not expressible here: every layer is "
                       "checkpointed")
    out += mesh_notes(plan)
    if plan.hardware.nodes > 1:
        out.append("run the same command on every node, adding --machine_rank N (0 on the first node)")
    return out + memory_saver_notes(plan) + ["what your script must do: README.md next to this file"]


def mesh_notes(plan: Plan) -> list[str]:
    """What accelerate.yaml cannot say about the plan's mesh (comments at its top)."""
    from shardtrain.emit.trainer import parallelism_config
    p, eng, out = plan.parallel, plan.chosen.strategy.engine, []
    if p.is_data_parallel_only and not p.is_hsdp:
        return out
    out.append(f"mesh {p.label()} (dp {p.dp}: each data-parallel rank its own samples; tp/cp ranks share them)")
    if eng is Engine.FSDP and p.cp > 1 and p.cp_mode is CpMode.ULYSSES:
        out.append("accelerate runs cp as torch's context_parallel (ring attention, CUDA flash/efficient SDPA "
                   "only): the same seq/cp tokens per rank as the plan's Ulysses, other collectives; Ulysses on "
                   "FSDP2 runs with shardtrain launch")
    if eng is Engine.DEEPSPEED and p.cp > 1:
        out.append(f"Ulysses sequence parallel {p.cp}: accelerate 1.15 does not export parallelism_config on its "
                   "DeepSpeed launch path; pass Accelerator(parallelism_config=ParallelismConfig("
                   + ", ".join(f"{k}={v!r}" for k, v in parallelism_config(plan).items())
                   + ", sp_handler=DeepSpeedSequenceParallelConfig(sp_seq_length=" + str(plan.train.seq_len)
                   + ", sp_seq_length_is_variable=False)))")
    if eng is Engine.DEEPSPEED and p.tp > 1:
        out.append(f"AutoTP {p.tp}: tensor_parallel.autotp_size in the DeepSpeed JSON (accelerate reads it there)")
    return out


def checkpointing_note(plan: Plan) -> str | None:
    """Activation checkpointing the plan needs where no accelerate/DeepSpeed key expresses it (DeepSpeed's
    activation_checkpointing block is for Megatron-style models, not HF ones; DDP has none); None when it is
    off or the FSDP config carries it (fsdp_activation_checkpointing)."""
    c = plan.chosen
    if c.gradient_checkpointing is GradCkpt.NONE or c.strategy.engine is Engine.FSDP:
        return None
    sel = c.gradient_checkpointing is GradCkpt.SELECTIVE
    every = f"every_n_layers={plan.train.selective_every}"
    kw = {"use_reentrant": False, **({"every_n_layers": plan.train.selective_every} if sel else {})}
    return (f"gradient checkpointing {c.gradient_checkpointing.value}: needed to fit, and no accelerate/DeepSpeed "
            f"key turns it on for an HF model: TrainingArguments(activation_checkpointing=True, "
            f"activation_checkpointing_kwargs={kw}) (trainer_args.json), or "
            "model.activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': False}"
            + (f", {every}" if sel else "") + ")")


def memory_saver_notes(plan: Plan, *, checkpointing: bool = True) -> list[str]:
    """What the plan assumed that no engine config can express (activation checkpointing outside FSDP,
    chunked loss, activation offload, QLoRA's quant storage): the training code must do it, as shardtrain's
    runtime does (shardtrain/runtime/loss.py). ``checkpointing``: include :func:`checkpointing_note`."""
    c, out = plan.chosen, []
    note = checkpointing_note(plan) if checkpointing else None
    if note:
        out.append(note)
    if c.loss.value == "chunked":
        out.append(f"the plan assumes a CHUNKED loss (lm_head + fp32 cross-entropy {plan.train.loss_chunk_tokens} "
                   "tokens at a time; its memory has no full logits term): no accelerate/DeepSpeed key does "
                   "this; HF Trainer: TrainingArguments(use_liger_kernel=True, liger_kernel_config="
                   "{'fused_linear_cross_entropy': True}), or shardtrain launch; model(**batch).loss does not fit")
    if c.activation_offload.value == "cpu":
        out.append("the plan assumes activation offload to host RAM (torch.autograd.graph.save_on_cpu around "
                   "the forward, pinned memory); no accelerate/DeepSpeed key does this: wrap your forward, "
                   "or use shardtrain launch")
    if c.tiled_mlp_tiles > 1:   # compiler/savers.py; shardtrain's runtime: runtime/tiled_mlp.py
        out.append(f"the plan assumes a TILED MLP ({c.tiled_mlp_tiles} sequence tiles per layer, only the MLP input "
                   "saved for backward, as DeepSpeed's TiledMLP in deepspeed/runtime/sequence_parallel/"
                   "ulysses_sp.py does): no accelerate/DeepSpeed/Trainer key does this; patch the MLP forward with "
                   "TiledMLP, or use shardtrain launch")
    if c.ckpt_offload:
        out.append("the plan assumes the checkpointed layer inputs in host RAM (ALST checkpoint offload, pinned "
                   "memory, brought back for each layer's recompute); no accelerate/DeepSpeed key does this: "
                   "use shardtrain launch")
    if c.method is Method.QLORA:
        from shardtrain.emit.trainer import BNB_CONFIG_JSON, quant_storage_dtype
        out.append(f"QLoRA: load the model with BitsAndBytesConfig(bnb_4bit_quant_storage={quant_storage_dtype(plan)}, "
                   f"...) ({BNB_CONFIG_JSON})")
    return out


def render_yaml(cfg: dict, comments: list[str] = ()) -> str:
    head = "".join(f"# {line}\n" for line in comments)
    return head + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
