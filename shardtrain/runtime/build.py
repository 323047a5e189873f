"""Read a run directory and assemble everything one rank trains with (`Run`)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from shardtrain import rundir_format as rf
from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import CpMode, Engine, Method, OffloadDevice
from shardtrain.runtime import engines as E
from shardtrain.runtime.data import StepSampler, TokenDataset, build_datasets, load_tokenizer
from shardtrain.runtime.dist import DistInfo
from shardtrain.runtime.mesh import MeshCoords, RankMesh, coords
from shardtrain.runtime.modeling import BuildSpec, build_model, compute_dtype, model_source
from shardtrain.runtime.optim import build_optimizer
from shardtrain.runtime.settings import Settings
from shardtrain.runtime.telemetry import comparison_table

log = logging.getLogger("shardtrain.worker")


def read_run_dir(run_dir: Path) -> tuple[Settings, Plan]:
    """run.yaml (the keys a rank reads) and plan.json with its runtime facts (compiler/facts.py). The
    engine config files next to them are exports of the same facts: one that was edited is refused."""
    run_dir = Path(run_dir)
    for f in (rf.RUN_YAML, rf.PLAN_JSON):
        if not (run_dir / f).is_file():
            raise FileNotFoundError(f"{run_dir}: missing {f} (create run directories with `shardtrain launch`)")
    run_yaml = run_dir / rf.RUN_YAML
    cfg = Settings.from_mapping(yaml.safe_load(run_yaml.read_text()) or {}, where=str(run_yaml))
    plan = Plan.from_json(json.loads((run_dir / rf.PLAN_JSON).read_text()))
    rt = plan.runtime
    if rt is None:
        raise ValueError(f"{run_dir / rf.PLAN_JSON}: no \"runtime\" facts (a `shardtrain plan --json` output is not a "
                         "run directory); create the run directory with `shardtrain launch` (or `emit --out DIR`)")
    for name, want in ((rf.DS_CONFIG_JSON, rt.deepspeed), (rf.FSDP_JSON, rt.fsdp.to_dict() if rt.fsdp else None)):
        if want is not None and (run_dir / name).is_file():
            _check_same(run_dir / name, json.loads((run_dir / name).read_text()), want)
    return cfg, plan


def _check_same(path: Path, got, want, key: str = "") -> None:
    """Raise at the first key where an engine config file differs from the plan's copy."""
    if isinstance(got, dict) and isinstance(want, dict):
        for k in sorted(set(got) | set(want), key=str):
            _check_same(path, got.get(k), want.get(k), f"{key}.{k}" if key else str(k))
    elif got != want:
        raise ValueError(f"{path}: {key or '<top level>'} is {got!r} but the plan it was written with has {want!r}; "
                         "the ranks run plan.json's copy, so change the run config and re-create the run directory "
                         "(`shardtrain launch`, or `emit --out DIR`) instead of editing the file")


@dataclass
class Run:
    run_dir: Path
    cfg: Settings
    plan: Plan
    info: DistInfo
    tokenizer: object
    train_data: TokenDataset
    eval_data: TokenDataset | None
    sampler: StepSampler
    engine: E.BaseEngine
    coords: MeshCoords | None = None
    """This rank's place in plan.parallel's mesh (runtime/mesh.py): dp rank for the data, tp/cp rank."""
    extra: dict = field(default_factory=dict)

    def write_memory_report(self, meter, phase) -> dict:
        """memory_rank{R}.json (measured vs predicted) and, on rank 0, the table in logs/."""
        measured, offloaded = meter.report()
        # model states after a full step (all grads present): per_gpu is now the breakdown at the
        # peak phase (compiler/phases.py), where e.g. FSDP grads are only partly materialised
        ms = self.plan.runtime.state_bytes
        predicted = ms.device_terms()
        cpu_pred = ms.host_bytes
        rec = {"rank": self.info.rank, "strategy": self.plan.strategy.value, "measured": measured,
               "offloaded": offloaded, "predicted": predicted, "predicted_offloaded": cpu_pred,
               "model_states_measured": sum(measured.values()), "model_states_predicted": sum(predicted.values()),
               "buffers_measured": meter.buffers, "buffers_predicted": int(ms.buffers),
               "largest_tensors": meter.largest,
               "last_step_phases": phase.phases}
        trace_table = None
        if "memtrace" in self.extra:  # run.memory_trace: the MemTracker peak per phase (runtime/memtrace.py)
            from shardtrain.runtime.memtrace_table import trace_record
            rec["memory_trace"], trace_table = trace_record(self.extra["memtrace"], self.plan)
        (self.run_dir / rf.memory_rank_name(self.info.rank)).write_text(json.dumps(rec, indent=1))
        if self.info.is_main:
            table = comparison_table(predicted, measured, cpu_pred, sum(offloaded.values()),
                                     peak={f"{ph} {k}": v for ph, d in phase.phases.items() for k, v in d.items()})
            if trace_table:
                table += "\n\npeak of live tensors per phase (MemTracker, real mode) vs the plan:\n" + trace_table
            (self.run_dir / rf.LOGS / rf.MEMORY_TABLE).write_text(table + "\n")
            log.info("predicted vs measured model-state bytes per rank (%s):\n%s", self.plan.strategy.value, table)
        return rec


def _plan_for_world(run_dir: Path, plan: Plan, info: DistInfo) -> Plan:
    """torchrun restarted this job on another world size (`launch --min-nodes`: a node was lost for good):
    the plan compiled for it before the launch (plans/world{W}.json, launcher/elastic.py)."""
    alt = run_dir / rf.ELASTIC_PLANS_DIR / rf.elastic_plan_name(info.world_size)
    if not alt.is_file():
        raise RuntimeError(f"plan.json was compiled for {plan.chosen.world_size} ranks but {info.world_size} are "
                           "running; re-plan with the right --nodes/--gpus-per-node (or launch with --min-nodes)")
    new = Plan.from_json(json.loads(alt.read_text()))
    if info.is_main:
        c, n = plan.chosen, new.chosen
        log.warning("the job runs on %d ranks, not %d (a node left): re-planned from %s: %s, micro batch %d x "
                    "accumulation %d (was %s, %d x %d); resuming from the last checkpoint", info.world_size,
                    c.world_size, alt.name, new.strategy.value, n.micro_batch_size, n.grad_accum_steps,
                    plan.strategy.value, c.micro_batch_size, c.grad_accum_steps)
    return new


def setup(run_dir: Path, info: DistInfo) -> Run:
    cfg, plan = read_run_dir(run_dir)
    if info.world_size != plan.chosen.world_size:
        plan = _plan_for_world(Path(run_dir), plan, info)
    c, rt = plan.chosen, plan.runtime
    dims = plan.parallel
    mc = coords(dims, info.rank, info.world_size)
    # seeded per dp rank: tp and cp peers of one sample draw the same dropout masks (LoRA dropout on a
    # TP-replicated input must agree); on a 1-D mesh dp rank = rank, as before
    torch.manual_seed(cfg.train.seed + mc.dp_rank)
    src = model_source(rt.model)
    tok = load_tokenizer(cfg.model.tokenizer, src.model_dir)
    if len(tok) > src.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tok)} tokens but the model's vocab_size is {src.config.vocab_size}")
    train, ev = build_datasets(tok, train_path=rt.data_train, eval_path=rt.data_eval,
                               eval_fraction=cfg.data.eval_fraction, fmt=cfg.data.format,
                               packing=cfg.data.packing, seq_len=plan.train.seq_len,
                               chat_template=cfg.data.chat_template)
    sampler = StepSampler(len(train), cfg.train.seed, micro_batch=c.micro_batch_size, grad_accum=c.grad_accum_steps,
                          world_size=dims.dp, rank=mc.dp_rank)  # tp/cp peers: the same samples
    s = c.strategy
    engine_kind = s.engine
    ds_config = rt.deepspeed
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
                     qlora_storage=compute_dtype(c.precision) if sharded else torch.uint8,
                     tiled_mlp_tiles=c.tiled_mlp_tiles, ckpt_offload=c.ckpt_offload,  # savers (runtime/modeling.py)
                     device_type=info.device.type, tp=dims.tp)
    model = build_model(src, spec, rank=info.rank, world_size=info.world_size, device=info.device,
                        ds_config=ds_config, materialize=engine_kind is not Engine.FSDP)
    if not (dims.cp > 1 and dims.cp_mode is CpMode.RING):  # ring: its own causal kernel (ring_attention.py)
        from shardtrain.runtime.packed_attention import install_packed
        install_packed(model)  # attention within each packed document, no [s, s] mask (runtime/packed_attention.py)
    if cfg.train.compile.value != "none":  # before the engine wraps it (runtime/compiling.py)
        from shardtrain.runtime.compiling import apply_compile
        apply_compile(model, cfg.train.compile, plan.model.decoder_layer_class)
    # DeepSpeedCPUAdam for ZeRO-Offload only: FSDP2's CPUOffloadPolicy (fsdp_offload) steps torch's own
    # optimizer on the host shards (DTensors)
    offload = s.deepspeed_offload

    def make_opt(params):
        return build_optimizer(c.optimizer, params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                               offload=offload)
    common = dict(precision=c.precision, grad_clip=cfg.train.grad_clip, device=info.device)
    if dims.tp > 1 and c.method is Method.QLORA:
        raise ValueError(f"plan.json: QLoRA with parallel.tp {dims.tp}: bitsandbytes' 4-bit Linear cannot be split "
                         "by DTensor tensor parallel; set parallel.tp: 1 (shard with dp_shard instead) or use "
                         "method lora")
    if engine_kind is Engine.DEEPSPEED:  # AutoTP (runtime/ds_autotp.py): what shardtrain runs, one line otherwise
        from shardtrain.runtime.ds_autotp import check_plan
        check_plan(dims.tp, c.method is Method.FULL, ds_config, s.zero_stage)
    if not dims.is_data_parallel_only and engine_kind is Engine.DDP:
        raise ValueError(f"plan.json: the mesh {dims.label()} needs a sharding engine (DDP runs data parallel "
                         "only); re-plan with strategy fsdp_full_shard (or parallel.tp/cp: 1)")
    ring = None  # the ring-cp helper (FSDP2 with cp_mode ring only)
    if engine_kind is Engine.DDP:
        eng = E.DDPEngine(model, make_opt(E.trainable(model)), **common)
    elif engine_kind is Engine.FSDP:
        # QLoRA is built (broadcast, then quantised identically) on every rank: nothing to load
        full = model.state_dict() if info.rank == 0 and info.world_size > 1 and c.method is not Method.QLORA else None
        mesh = RankMesh(dims, info.device.type) if (not dims.is_data_parallel_only or dims.is_hsdp) else None
        eng = E.FSDP2Engine(model, make_opt, settings=rt.fsdp, full_state=full, mesh=mesh, **common)
        del full
        if dims.cp > 1:
            ring = _install_cp(model, dims, mesh, info.device.type)
    else:
        client = rt.deepspeed_client_optimizer
        if info.device.type == "cpu" and rt.deepspeed_cpu_config is not None:
            # DeepSpeed's "Lion" is FusedLion (a CUDA op): on CPU hand it our Lion as a client optimizer
            log.warning("ds_config optimizer Lion: FusedLion needs CUDA; using shardtrain's Lion on CPU")
            ds_config, client = rt.deepspeed_cpu_config, True
        opt = make_opt(E.trainable(model)) if client else None
        eng = E.DeepSpeedEngine(model, opt, ds_config=ds_config, grad_accum=c.grad_accum_steps,
                                zero_stage=s.zero_stage, offload_optimizer=offload,
                                offload_params=s.offload_params is not OffloadDevice.NONE, **common)
    run = Run(run_dir=Path(run_dir), cfg=cfg, plan=plan, info=info, tokenizer=tok, train_data=train,
              eval_data=ev, sampler=sampler, engine=eng, coords=mc)
    if ring is not None:  # cp_mode ring: the worker shards each micro-step through it (runtime/ring_attention.py)
        run.extra["ring"] = ring
    return run


def _install_cp(model, dims, mesh: RankMesh, device_type: str):
    """Context parallel on the FSDP2 engine: Ulysses all-to-all attention over the cp group
    (runtime/context_parallel.py); the loop slices each micro-batch per cp rank (worker.py). Ring
    (cp_mode ring, CUDA only; on CPU refused in one line, the preflight says so first): the model's
    attention becomes causal SDPA and the returned RingCP wraps each micro-step in torch's
    context_parallel (runtime/ring_attention.py). Returns the RingCP, None for Ulysses."""
    if dims.cp_mode is CpMode.RING:
        from shardtrain.runtime.ring_attention import RingCP, install_ring, refuse_ring_on
        refuse_ring_on(device_type)
        install_ring(model)
        return RingCP(mesh["cp"])
    from shardtrain.runtime.context_parallel import install_ulysses
    install_ulysses(model, mesh.group("cp"))
    return None
