"""Plan -> `accelerate launch --config_file` YAML (accelerate 1.15 ClusterConfig keys).

- DeepSpeed plans: `distributed_type: DEEPSPEED` pointing at our generated ds_config.json
  (`deepspeed_config_file`). accelerate then forbids the duplicate keys it would otherwise take from
  the YAML (zero_stage, gradient_accumulation_steps, gradient_clipping, offload_*, zero3_save_16bit_model,
  and `mixed_precision`: "When using `deepspeed_config_file`, the following accelerate config variables
  will be ignored"), so those are left out; precision lives in the DeepSpeed JSON.
- FSDP plans: `distributed_type: FSDP`, `fsdp_version: 2`, keys as `accelerate config` writes them;
  HYBRID_SHARD via `parallelism_config` (dp_replicate × dp_shard).
- DDP plans: MULTI_GPU (or NO for one process).
Multi-node: rdzv_backend c10d on main_process_ip:port, so one file serves every node (pass
`--machine_rank` per node; c10d ignores it for rank assignment).
"""
from __future__ import annotations

import yaml

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import Engine, Precision
from shardtrain.emit.fsdp import fsdp_settings
from shardtrain.rundir_format import DS_CONFIG_JSON

_MIXED = {Precision.BF16: "bf16", Precision.FP16: "fp16", Precision.FP32: "no"}
#: Keys accelerate refuses next to deepspeed_config_file (accelerate/utils/dataclasses.py
#: DeepSpeedPlugin._deepspeed_config_checks), as they appear in the YAML.
DS_FILE_CONFLICTS = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                     "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                     "zero3_save_16bit_model")
FSDP_KEYS = ("fsdp_version", "fsdp_reshard_after_forward", "fsdp_offload_params", "fsdp_auto_wrap_policy",
             "fsdp_transformer_layer_cls_to_wrap", "fsdp_min_num_params", "fsdp_state_dict_type",
             "fsdp_cpu_ram_efficient_loading", "fsdp_sync_module_states", "fsdp_activation_checkpointing",
             "fsdp_activation_checkpointing_offload", "fsdp_backward_prefetch", "fsdp_forward_prefetch",
             "fsdp_use_orig_params", "fsdp_sharding_strategy", "fsdp_ignored_modules")


class AccelerateConfigError(ValueError):
    """A plan that needs more information to become an accelerate config."""


def accelerate_config(plan: Plan, *, ds_config_path: str = DS_CONFIG_JSON, main_process_ip: str | None = None,
                      main_process_port: int = 29500, machine_rank: int = 0) -> dict:
    """The accelerate config dict (write it with :func:`render_yaml`)."""
    c, hw = plan.chosen, plan.hardware
    engine = c.strategy.engine
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
    if len(f.mesh_shape) == 2:
        d["parallelism_config"] = {"parallelism_config_dp_replicate_size": f.mesh_shape[0],
                                   "parallelism_config_dp_shard_size": f.mesh_shape[1]}
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
        if c.gradient_checkpointing.value == "selective":
            out.append("selective checkpointing is not expressible here: every layer is checkpointed")
    if plan.hardware.nodes > 1:
        out.append("run the same command on every node, adding --machine_rank N (0 on the first node)")
    return out + memory_saver_notes(plan)


def memory_saver_notes(plan: Plan) -> list[str]:
    """What the plan assumed that no engine config can express (chunked loss, activation offload):
    the training code must do it, as shardtrain's runtime does (shardtrain/runtime/loss.py)."""
    c, out = plan.chosen, []
    if c.loss.value == "chunked":
        out.append(f"the plan assumes a CHUNKED loss (lm_head + fp32 cross-entropy {plan.train.loss_chunk_tokens} "
                   "tokens at a time; its memory has no full logits term): no accelerate/DeepSpeed key does "
                   "this; HF Trainer: TrainingArguments(use_liger_kernel=True, liger_kernel_config="
                   "{'fused_linear_cross_entropy': True}), or shardtrain launch; model(**batch).loss does not fit")
    if c.activation_offload.value == "cpu":
        out.append("the plan assumes activation offload to host RAM (torch.autograd.graph.save_on_cpu around "
                   "the forward, pinned memory); no accelerate/DeepSpeed key does this: wrap your forward, "
                   "or use shardtrain launch")
    return out


def render_yaml(cfg: dict, comments: list[str] = ()) -> str:
    head = "".join(f"# {line}\n" for line in comments)
    return head + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
