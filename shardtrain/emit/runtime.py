"""Plan + run config -> the runtime facts a rank reads from plan.json (compiler/facts.py RuntimeFacts).

The runtime imports neither the config package nor the compiler's internals nor the emitters: whatever
it used to re-derive on every rank is resolved here once, when the run dir is written (launcher/rundir.py,
`shardtrain emit`), and carried in plan.json under "runtime":
- the data sources (a cached Hub dataset id -> its snapshot directory, config/hub.py dataset_source);
- the model source: a checkpoint directory (a local one, or the cached snapshot of a Hub id ORG/NAME[@REV],
  config/hub.py) or the config.json contents (a preset, a config.json path, or the `--params` shape);
- the predicted model-state bytes per rank, GPU and host (compiler/memory.py model_state_bytes);
- FLOPs per token (compiler/flops.py) and the GPU preset's peak for MFU (config/presets.py);
- the engine settings the run files were written with: the FSDP2 settings (emit/fsdp.py) or the DeepSpeed
  config (emit/deepspeed.py) — built from the plan here, so the ranks refuse a run file that differs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from shardtrain import rundir_format as rf
from shardtrain.compiler import flops as F
from shardtrain.compiler.facts import ModelRef, RuntimeFacts, StateBytes
from shardtrain.compiler.inventory import tensor_inventory
from shardtrain.compiler.memory import model_state_bytes
from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import Engine, Method
from shardtrain.emit import deepspeed as K


def model_ref(cfg, plan: Plan) -> ModelRef:
    """Where the ranks load the model from (the lookup runtime/modeling.py did on every rank before)."""
    m = cfg.model
    init = str(getattr(m.init, "value", m.init))
    if m.name is None:
        return ModelRef(name=None, checkpoint_dir=None, hf_config=plan.model.to_hf_config(), init=init)
    from shardtrain.config import hub
    p = Path(m.name).expanduser()
    if hub.is_hub_id(m.name) and hub.snapshot_dir(m.name):  # ORG/NAME[@REV]: the cached snapshot
        p = hub.snapshot_dir(m.name)
    if p.is_dir():
        return ModelRef(name=m.name, checkpoint_dir=str(p), hf_config=None, init=init)
    from shardtrain.config.presets import load_model_config
    raw, _ = load_model_config(m.name)
    return ModelRef(name=m.name, checkpoint_dir=None, hf_config=dict(raw), init=init)


def data_source(path: str | None) -> str | None:
    """A data path as the ranks read it: a cached Hub dataset id -> its snapshot directory. An unresolvable
    one stays as given: the launcher's data check (launcher/datacheck.py) names the problem and the fix."""
    if not path:
        return path
    from shardtrain.config import hub
    try:
        return str(hub.dataset_source(path))
    except (ValueError, OSError):
        return str(path)


def state_bytes(plan: Plan) -> StateBytes:
    """compiler.memory.ModelStateBytes of the chosen candidate (steady-state model states)."""
    c, t = plan.chosen, plan.train
    groups = tensor_inventory(plan.model, c.method, t.lora.rank, plan.lora_targets or t.lora.targets)
    ms = model_state_bytes(plan.model, groups, c.strategy, plan.hardware, method=c.method, precision=c.precision,
                           optimizer=c.optimizer, fsdp_defer_grad_sync=c.fsdp_defer_grad_sync,
                           grad_accum_steps=c.grad_accum_steps, parallel=plan.parallel)
    return StateBytes(params=int(ms.params), grads=int(ms.grads), master_params=int(ms.master_params),
                      optimizer_states=int(ms.optimizer_states), buffers=int(ms.buffers), host_bytes=int(ms.cpu_bytes))


def peak_tflops(plan: Plan) -> float:
    """The plan's GPU preset peak for the training precision, else the plan's bf16 figure (0 for fp32)."""
    from shardtrain.config.presets import get_gpu_preset
    precision = plan.chosen.precision.value
    try:
        return get_gpu_preset(plan.hardware.gpu_name).tflops(precision)
    except (KeyError, ValueError):
        return plan.hardware.bf16_tflops if precision != "fp32" else 0.0


def runtime_facts(cfg, plan: Plan) -> RuntimeFacts:
    """The facts for `plan` run with `cfg` (a RunConfig). Raises ValueError (DeepSpeedConfigError) for a
    plan the emitters cannot configure, naming the key and the fix."""
    c, m = plan.chosen, plan.model
    full = c.method is Method.FULL
    flops = F.train_flops_per_token(m, plan.train.seq_len, full_finetune=full)
    one = F.train_flops_per_token(m, plan.train.seq_len, full_finetune=full, checkpointed_layers=1)
    kw: dict = {}
    if c.strategy.engine is Engine.DEEPSPEED:
        t = cfg.train
        ds = K.deepspeed_config(plan, grad_clip=t.grad_clip, lr=t.lr, weight_decay=t.weight_decay,
                                nvme_path=cfg.hardware.nvme_path)
        kw = dict(deepspeed=ds, deepspeed_client_optimizer=K.client_optimizer(plan) is not None,
                  deepspeed_cpu_config=K.cpu_config(ds, plan))
    elif c.strategy.engine is Engine.FSDP:
        from shardtrain.emit.fsdp import fsdp_settings
        kw = dict(fsdp=fsdp_settings(plan))
    return RuntimeFacts(model=model_ref(cfg, plan), state_bytes=state_bytes(plan),
                        data_train=data_source(cfg.data.train), data_eval=data_source(cfg.data.eval),
                        model_flops_per_token=flops.model, recompute_flops_per_layer_token=one.hardware - one.model,
                        num_layers=m.num_layers, peak_tflops=peak_tflops(plan), **kw)


def with_runtime_facts(cfg, plan: Plan) -> Plan:
    """The plan as a run dir's plan.json carries it (its runtime facts resolved for `cfg`)."""
    return dataclasses.replace(plan, runtime=runtime_facts(cfg, plan))


def engine_files(plan: Plan) -> dict[str, dict]:
    """The engine config files of a plan with runtime facts, by file name: what the runtime was given."""
    rt = plan.runtime
    if rt is None:
        raise ValueError("engine_files: the plan has no runtime facts; call with_runtime_facts(cfg, plan) first")
    if rt.deepspeed is not None:
        return {rf.DS_CONFIG_JSON: rt.deepspeed}
    if rt.fsdp is not None:
        return {rf.FSDP_JSON: rt.fsdp.to_dict()}
    return {}
