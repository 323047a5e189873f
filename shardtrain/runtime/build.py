"""Read a run directory and assemble everything one rank trains with (`Run`)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import Engine, Method, OffloadDevice
from shardtrain.config.schema import RunConfig, parse_run_config
from shardtrain.runtime import engines as E
from shardtrain.runtime.data import StepSampler, TokenDataset, build_datasets, load_tokenizer
from shardtrain.runtime.dist import DistInfo
from shardtrain.runtime.modeling import BuildSpec, build_model, compute_dtype, model_source
from shardtrain.runtime.optim import build_optimizer
from shardtrain.runtime.telemetry import comparison_table

log = logging.getLogger("shardtrain.worker")


def read_run_dir(run_dir: Path) -> tuple[RunConfig, Plan, dict | None, dict]:
    run_dir = Path(run_dir)
    for f in ("run.yaml", "plan.json"):
        if not (run_dir / f).is_file():
            raise FileNotFoundError(f"{run_dir}: missing {f} (create run directories with `shardtrain launch`)")
    cfg = parse_run_config(yaml.safe_load((run_dir / "run.yaml").read_text()) or {})
    plan = Plan.from_json(json.loads((run_dir / "plan.json").read_text()))
    ds = run_dir / "ds_config.json"
    ds_config = json.loads(ds.read_text()) if ds.is_file() else None
    fs = run_dir / "fsdp.json"
    fsdp = json.loads(fs.read_text()) if fs.is_file() else {}
    if plan.strategy.engine is Engine.DEEPSPEED and ds_config is None:
        raise FileNotFoundError(f"{run_dir}: plan uses DeepSpeed ({plan.strategy.value}) but ds_config.json is missing")
    return cfg, plan, ds_config, fsdp


def check_ds_config(ds: dict, plan: Plan, grad_clip: float) -> dict:
    c = plan.chosen
    want = {"train_micro_batch_size_per_gpu": c.micro_batch_size, "gradient_accumulation_steps": c.grad_accum_steps,
            "train_batch_size": c.micro_batch_size * c.grad_accum_steps * c.world_size}
    for k, v in want.items():
        if k in ds and int(ds[k]) != v:
            raise ValueError(f"ds_config.json: {k}={ds[k]} but the plan has {v}; re-emit the config from plan.json")
    ds = {**want, **ds}
    ds.setdefault("gradient_clipping", grad_clip)
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if stage != c.strategy.zero_stage:
        raise ValueError(f"ds_config.json: zero_optimization.stage={stage} but the plan is {c.strategy.value}")
    return ds


@dataclass
class Run:
    run_dir: Path
    cfg: RunConfig
    plan: Plan
    info: DistInfo
    tokenizer: object
    train_data: TokenDataset
    eval_data: TokenDataset | None
    sampler: StepSampler
    engine: E.BaseEngine
    extra: dict = field(default_factory=dict)

    def write_memory_report(self, meter, phase) -> dict:
        """memory_rank{R}.json (measured vs predicted) and, on rank 0, the table in logs/."""
        measured, offloaded = meter.report()
        # model states after a full step (all grads present): per_gpu is now the breakdown at the
        # peak phase (compiler/phases.py), where e.g. FSDP grads are only partly materialised
        ms = predicted_state_bytes(self.plan)
        predicted = {k: int(getattr(ms, k)) for k in ("params", "grads", "master_params", "optimizer_states")}
        cpu_pred = int(ms.cpu_bytes)
        rec = {"rank": self.info.rank, "strategy": self.plan.strategy.value, "measured": measured,
               "offloaded": offloaded, "predicted": predicted, "predicted_offloaded": cpu_pred,
               "model_states_measured": sum(measured.values()), "model_states_predicted": sum(predicted.values()),
               "buffers_measured": meter.buffers, "buffers_predicted": int(ms.buffers),
               "largest_tensors": meter.largest,
               "last_step_phases": phase.phases}
        trace_table = None
        if "memtrace" in self.extra:  # run.memory_trace: the MemTracker peak per phase (runtime/memtrace.py)
            from shardtrain.runtime.memtrace_table import trace_record
            rec["memory_trace"], trace_table = trace_record(self.extra["memtrace"], self.run_dir / "plan.json")
        (self.run_dir / f"memory_rank{self.info.rank}.json").write_text(json.dumps(rec, indent=1))
        if self.info.is_main:
            table = comparison_table(predicted, measured, cpu_pred, sum(offloaded.values()),
                                     peak={f"{ph} {k}": v for ph, d in phase.phases.items() for k, v in d.items()})
            if trace_table:
                table += "\n\npeak of live tensors per phase (MemTracker, real mode) vs the plan:\n" + trace_table
            (self.run_dir / "logs" / "memory_table.txt").write_text(table + "\n")
            log.info("predicted vs measured model-state bytes per rank (%s):\n%s", self.plan.strategy.value, table)
        return rec


def predicted_state_bytes(plan: Plan):
    """compiler.memory.ModelStateBytes of the plan's chosen candidate (steady-state model states)."""
    from shardtrain.compiler.inventory import tensor_inventory
    from shardtrain.compiler.memory import model_state_bytes
    c, t = plan.chosen, plan.train
    groups = tensor_inventory(plan.model, c.method, t.lora.rank, plan.lora_targets or t.lora.targets)
    return model_state_bytes(plan.model, groups, c.strategy, plan.hardware, method=c.method, precision=c.precision,
                             optimizer=c.optimizer, fsdp_defer_grad_sync=c.fsdp_defer_grad_sync)


def predicted_cpu_bytes(plan: Plan) -> int:
    return int(predicted_state_bytes(plan).cpu_bytes)


def setup(run_dir: Path, info: DistInfo) -> Run:
    cfg, plan, ds_config, fsdp = read_run_dir(run_dir)
    c = plan.chosen
    if info.world_size != c.world_size:
        raise RuntimeError(f"plan.json was compiled for {c.world_size} ranks but {info.world_size} are running; "
                           "re-plan with the right --nodes/--gpus-per-node")
    torch.manual_seed(cfg.train.seed + info.rank)
    src = model_source(cfg, plan)
    tok = load_tokenizer(cfg.model.tokenizer, src.model_dir)
    if len(tok) > src.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {src.config.vocab_size}")
    train, ev = build_datasets(tok, train_path=cfg.data.train, eval_path=cfg.data.eval,
                               eval_fraction=cfg.data.eval_fraction, fmt=cfg.data.format,
                               packing=cfg.data.packing, seq_len=plan.train.seq_len,
                               chat_template=getattr(cfg.data, "chat_template", None))
    sampler = StepSampler(len(train), cfg.train.seed, micro_batch=c.micro_batch_size, grad_accum=c.grad_accum_steps,
                          world_size=info.world_size, rank=info.rank)
    s = c.strategy
    engine_kind = s.engine
    if ds_config is not None and engine_kind is Engine.DEEPSPEED:
        ds_config = check_ds_config(ds_config, plan, cfg.train.grad_clip)
    sharded = s.shards_params
    # QLoRA under FSDP2 / ZeRO-3: the packed NF4 bytes are stored in the compute dtype
    # (bnb_4bit_quant_storage, modeling.quantize_4bit) so the engines shard them like any 16-bit
    # parameter; Linear4bit re-attaches its QuantState to the gathered weight
    # (bitsandbytes nn/modules.py fix_4bit_weight_quant_state_from_module)
    sharded = sharded or engine_kind is Engine.FSDP
    lora = None
    if c.method is not Method.FULL:
        lo = plan.train.lora
        lora = {"rank": lo.rank, "alpha": lo.alpha, "dropout": lo.dropout, "targets": plan.lora_targets or lo.targets}
    spec = BuildSpec(engine=engine_kind, method=c.method, precision=c.precision, grad_ckpt=c.gradient_checkpointing,
                     selective_every=plan.train.selective_every, attention=plan.train.attention.value,
                     seed=cfg.train.seed, lora=lora, layer_class=plan.model.decoder_layer_class,
                     zero_stage=s.zero_stage, num_params=plan.model.num_params,
                     qlora_storage=compute_dtype(c.precision) if sharded else torch.uint8)
    model = build_model(src, spec, rank=info.rank, world_size=info.world_size, device=info.device,
                        ds_config=ds_config, materialize=engine_kind is not Engine.FSDP)
    if cfg.train.compile.value != "none":  # before the engine wraps it (runtime/compiling.py)
        from shardtrain.runtime.compiling import apply_compile
        apply_compile(model, cfg.train.compile, plan.model.decoder_layer_class)
    offload = s.offload_optimizer is not OffloadDevice.NONE

    def make_opt(params):
        return build_optimizer(c.optimizer, params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                               offload=offload)
    common = dict(precision=c.precision, grad_clip=cfg.train.grad_clip, device=info.device)
    if engine_kind is Engine.DDP:
        eng = E.DDPEngine(model, make_opt(E.trainable(model)), **common)
    elif engine_kind is Engine.FSDP:
        # QLoRA is built (broadcast, then quantised identically) on every rank: nothing to load
        full = model.state_dict() if info.rank == 0 and info.world_size > 1 and c.method is not Method.QLORA else None
        from shardtrain.emit.fsdp import FsdpSettings, fsdp_settings
        settings = FsdpSettings.from_dict(fsdp) if fsdp else fsdp_settings(plan)
        eng = E.FSDP2Engine(model, make_opt, settings=settings, full_state=full, **common)
        del full
    else:
        if (info.device.type == "cpu" and not offload
                and (ds_config.get("optimizer") or {}).get("type", "").lower() == "lion"):
            # DeepSpeed's "Lion" is FusedLion (a CUDA op): on CPU hand it our Lion as a client optimizer
            log.warning("ds_config optimizer Lion: FusedLion needs CUDA; using shardtrain's Lion on CPU")
            ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
            ds_config["zero_allow_untested_optimizer"] = True
        opt = None if "optimizer" in ds_config else make_opt(E.trainable(model))
        eng = E.DeepSpeedEngine(model, opt, ds_config=ds_config, grad_accum=c.grad_accum_steps,
                                zero_stage=s.zero_stage, offload_optimizer=offload,
                                offload_params=s.offload_params is not OffloadDevice.NONE, **common)
    return Run(run_dir=Path(run_dir), cfg=cfg, plan=plan, info=info, tokenizer=tok, train_data=train,
               eval_data=ev, sampler=sampler, engine=eng)
