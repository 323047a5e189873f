"""`shardtrain check`: lint a hand-written DeepSpeed JSON or accelerate YAML before it costs a job
(the other files `emit` writes: emit/check_bundle.py).

Each finding names the key, the problem and the fix. DeepSpeed key names come from
shardtrain.emit.deepspeed (the one module that spells them); accelerate keys from
shardtrain.emit.accelerate. Pure: takes dicts (plus a base directory to follow
`deepspeed_config_file`), returns findings.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shardtrain.emit import deepspeed as K
from shardtrain.emit import engine_schema as S
from shardtrain.emit.accelerate import DS_FILE_CONFLICTS

ERROR, WARNING, INFO = "error", "warning", "info"
_DTYPE_OF = {"bf16": "bfloat16", "fp16": "float16", "no": "float32", None: "float32"}
_8BIT_HINTS = ("8bit", "bnb", "bitsandbytes", "paged")
_DS_CPU_TYPES = {"adam", "adamw", "adagrad", "lion"}
_ZERO_SUPPORTED_TYPES = {"adam", "adamw", "adagrad", "lion", "muon"}


@dataclass(frozen=True)
class Finding:
    severity: str
    key: str
    problem: str
    fix: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.key}: {self.problem}. Fix: {self.fix}"

    def to_json(self, file: str) -> dict:
        return {"file": file, "key": self.key, "severity": self.severity, "message": self.problem, "fix": self.fix}


def _accelerate_unknown(cfg: dict, out: list) -> None:
    """Top-level keys outside accelerate's ClusterConfig make `accelerate launch` raise; keys of a nested
    block that its launcher does not know are silently ignored (engine_schema: both read from accelerate)."""
    try:
        top = S.accelerate_top_keys()
    except ImportError:
        out.append(Finding(WARNING, "<top level>", "accelerate is not installed here, so key names were not checked",
                           "run `shardtrain check` where accelerate is installed"))
        return
    for k in cfg:
        if k not in top:
            hit = S.near_miss(k, top)
            out.append(Finding(ERROR, str(k), "not a key of accelerate's ClusterConfig (`accelerate launch` raises "
                               "'unknown keys')", f"rename it to '{hit}'" if hit else "delete it"))
    for block, sub in cfg.items():
        if not isinstance(sub, dict) or block not in top:
            continue
        prefix, known = S.accelerate_block_keys(block)
        for k in sub:
            name = k if str(k).startswith(prefix) else prefix + str(k)
            if name not in known:
                hit = S.near_miss(k, known | {x[len(prefix):] for x in known if prefix and x.startswith(prefix)})
                out.append(Finding(WARNING, f"{block}.{k}", "accelerate's launcher does not know this key and "
                                   "silently ignores it", f"rename it to '{hit}'" if hit else "delete it"))


def find_auto_keys(d, prefix: str = ""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from find_auto_keys(v, key + ".")
        elif isinstance(v, str) and v.lower() == K.AUTO:
            yield key


def check_deepspeed(cfg: dict, *, consumer: str = "deepspeed", world_size: int | None = None,
                    optimizer: str | None = None, method: str | None = None,
                    quant_storage: str | None = None, heads: tuple[int, int] | None = None) -> list[Finding]:
    """Lint a DeepSpeed config dict. consumer: deepspeed (deepspeed.initialize), trainer (HF
    TrainingArguments(deepspeed=...)) or accelerate (referenced from an accelerate YAML). world_size: the
    processes it runs on; heads: the model's (attention heads, kv heads) when known (mesh checks).
    Key names, aliases, types and the extra-keys policy are the installed DeepSpeed's own
    (engine_schema runs its parser); the checks below are the pitfalls its parser does not see."""
    if not isinstance(cfg, dict):
        return [Finding(ERROR, "<top level>", "not a JSON object", "write a {...} DeepSpeed config")]
    out = _engine_findings(cfg, consumer, world_size)
    z = cfg.get(K.ZERO) or {}
    if not isinstance(z, dict):
        z = {}
    stage = K.zero_stage(cfg)
    stage = stage if isinstance(stage, int) else 0
    op, oo = z.get(K.OFFLOAD_PARAM) or {}, z.get(K.OFFLOAD_OPTIMIZER) or {}
    if isinstance(op, dict) and op.get(K.DEVICE, "none") != "none" and stage < 3:
        out.append(Finding(ERROR, f"{K.ZERO}.{K.OFFLOAD_PARAM}", f"parameter offload needs stage 3, stage is {stage} "
                           "(DeepSpeed silently ignores it: parameters stay on the GPU)",
                           f"set {K.ZERO}.{K.STAGE}: 3, or delete {K.OFFLOAD_PARAM}"))
    if stage < 3:
        for k in z:
            if str(k).startswith(K.STAGE3_PREFIX):
                out.append(Finding(WARNING, f"{K.ZERO}.{k}", f"only used by stage 3 (stage is {stage})", "delete it"))
    for name, blk in ((K.OFFLOAD_PARAM, op), (K.OFFLOAD_OPTIMIZER, oo)):
        if isinstance(blk, dict) and blk.get(K.DEVICE) == "nvme" and not blk.get(K.NVME_PATH):
            out.append(Finding(ERROR, f"{K.ZERO}.{name}.{K.NVME_PATH}", "device is nvme but no nvme_path is set",
                               "set nvme_path to a directory on a local NVMe drive"))
    from shardtrain.emit.check_mesh import deepspeed_mesh
    out += deepspeed_mesh(cfg, world_size, stage, heads)
    out += _batch(cfg, world_size, consumer)
    out += _optimizer(cfg, stage, oo, optimizer)
    if method == "qlora" and stage == 3:
        dtype = "bfloat16" if (cfg.get(K.BF16) or {}).get(K.ENABLED) is True else \
            "float16" if (cfg.get(K.FP16) or {}).get(K.ENABLED) is True else "float32"
        out += _quant_storage(dtype, quant_storage, "ZeRO-3")
    return out


def auto_allowed(consumer: str) -> dict[str, str]:
    """{key: who fills it} for the keys the consumer replaces "auto" in."""
    fills = S.trainer_fills() if consumer in ("trainer", "accelerate") else {}
    if not fills and consumer in ("trainer", "accelerate"):  # transformers not installed here
        fills = {k: "the HF Trainer" for k in K.TRAINER_AUTO_KEYS}
    if consumer == "accelerate":  # Accelerator._prepare_deepspeed fills these, not betas/eps
        fills = {k: v for k, v in fills.items() if k in K.ACCELERATE_AUTO_KEYS}
    return fills


def _placeholder(cfg: dict, allowed) -> dict:
    """A copy with the values the Trainer/accelerate will fill set to something DeepSpeed accepts
    (batch sizes 1, clipping 1.0, precision off); other "auto"s stay for DeepSpeed to judge."""
    work = json.loads(json.dumps(cfg))
    for key in find_auto_keys(cfg):
        if key not in allowed:
            continue
        *parents, leaf = key.split(".")
        d = work
        for p in parents:
            d = d[p]
        if leaf in (K.TRAIN_BATCH_SIZE, K.MICRO_BATCH, K.GRAD_ACCUM):
            d[leaf] = 1
        elif leaf == K.GRADIENT_CLIPPING:
            d[leaf] = 1.0
        elif leaf == K.ENABLED:
            d[leaf] = False
    return work


def _engine_findings(cfg: dict, consumer: str, world_size: int | None) -> list[Finding]:
    try:
        import contextlib
        import sys
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout: keep `check --json` clean
            import deepspeed  # noqa: F401  (lazy: the plan path never imports it)
    except ImportError:
        return [Finding(WARNING, "<top level>", "DeepSpeed is not installed here, so key names and types were not "
                        "checked against it", "run `shardtrain check` where deepspeed is installed")]
    allowed = auto_allowed(consumer)
    work = _placeholder(cfg, allowed)
    nums = list(K.batch_sizes(work).values())
    world = world_size or 1
    if all(isinstance(v, int) and v > 0 for v in nums) and nums[0] % (nums[1] * nums[2]) == 0 and not world_size:
        # our _batch check judges the arithmetic; DeepSpeed's parser divides the world by sequence_parallel_size
        sp = K.mesh_sizes(work)[K.SEQUENCE_PARALLEL_SIZE]
        world = nums[0] // (nums[1] * nums[2]) * (sp if isinstance(sp, int) and sp > 0 else 1)
    raw, trace = S.deepspeed_findings(work, world_size=world)
    out = [Finding(r.severity, S._dotted(r.path), r.problem, r.fix) for r in raw]
    seen = {f.key for f in out}
    for key in find_auto_keys(cfg):
        if key in allowed or key in seen:
            continue
        path = tuple(key.split("."))
        if S.auto_in_validated_block(trace, path):
            out.append(Finding(WARNING, key, '"auto" is dropped by DeepSpeed here (DeepSpeedConfigModel removes '
                               '"auto" values) and its default is used' + ("; the HF Trainer does not fill this key"
                               if consumer != "deepspeed" else ""), "write the value you want, or delete the key"))
        else:
            who = {"trainer": "the HF Trainer does not fill this key", "accelerate": "accelerate does not fill this key"}
            out.append(Finding(ERROR, key, '"auto" ' + who.get(consumer, "is only filled in by the HF Trainer/"
                               "accelerate; DeepSpeed passes the string on where a number belongs"),
                               "write the value (shardtrain emit computes it from the plan)"))
    return out


def looks_like_trainer_template(cfg) -> bool:
    """A DeepSpeed JSON with "auto" values is written for the HF Trainer/accelerate to fill."""
    return isinstance(cfg, dict) and any(True for _ in find_auto_keys(cfg))


def _batch(cfg: dict, world: int | None, consumer: str) -> list[Finding]:
    vals = K.batch_sizes(cfg)
    nums = {k: v for k, v in vals.items() if isinstance(v, int) and not isinstance(v, bool)}
    out = [Finding(ERROR, k, f"{v!r} must be a positive integer", "write e.g. 1")
           for k, v in nums.items() if v <= 0]
    if out or len(nums) < 3:
        if not nums and consumer == "deepspeed":
            out.append(Finding(ERROR, K.TRAIN_BATCH_SIZE, "no batch size is set", f"set {K.TRAIN_BATCH_SIZE}, "
                               f"{K.MICRO_BATCH} and {K.GRAD_ACCUM} (shardtrain emit writes all three)"))
        return out
    tb, mb, ga = nums[K.TRAIN_BATCH_SIZE], nums[K.MICRO_BATCH], nums[K.GRAD_ACCUM]
    ranks = "ranks"
    if world is not None and K.config_batch_world(cfg, world) != world:
        # Ulysses: DeepSpeed's batch world is world / sequence_parallel_size (runtime/config.py); the
        # mesh check reports a world that does not divide
        bw = K.config_batch_world(cfg, world)
        if bw != int(bw):
            return []
        ranks = f"data-parallel ranks (world {world} / {K.SEQUENCE_PARALLEL_SIZE} {world // int(bw)})"
        world = int(bw)
    if tb % (mb * ga):
        return [Finding(ERROR, K.TRAIN_BATCH_SIZE, f"{tb} is not micro {mb} × accumulation {ga} × any world size",
                        f"use a multiple of {mb * ga}, e.g. {mb * ga * max(1, round(tb / (mb * ga)))}")]
    if world is not None and tb != mb * ga * world:
        return [Finding(ERROR, K.TRAIN_BATCH_SIZE, f"{tb} != micro {mb} × accumulation {ga} × {world} {ranks} = "
                        f"{mb * ga * world} (DeepSpeed asserts equality)",
                        f"set {K.TRAIN_BATCH_SIZE}: {mb * ga * world} or {K.GRAD_ACCUM}: {tb // (mb * world)}"
                        if tb % (mb * world) == 0 else f"set {K.TRAIN_BATCH_SIZE}: {mb * ga * world}")]
    return []


def _optimizer(cfg: dict, stage: int, oo, optimizer: str | None) -> list[Finding]:
    out = []
    opt = cfg.get(K.OPTIMIZER) if isinstance(cfg.get(K.OPTIMIZER), dict) else None
    typ = str(opt.get(K.TYPE, "")) if opt else ""
    offload = isinstance(oo, dict) and oo.get(K.DEVICE, "none") in ("cpu", "nvme")
    eight = (optimizer == "adamw8bit") or any(h in typ.lower() for h in _8BIT_HINTS)
    if eight and offload:
        out.append(Finding(ERROR, f"{K.ZERO}.{K.OFFLOAD_OPTIMIZER}", "8-bit (bitsandbytes) optimizers cannot run with "
                           "ZeRO-Offload: DeepSpeed only runs DeepSpeedCPUAdam/CPULion on the host and there is no "
                           "8-bit CPU Adam", "use optimizer AdamW (DeepSpeedCPUAdam) or remove offload_optimizer"))
    elif offload and opt is None and cfg.get(K.FORCE_DS_CPU_OPTIMIZER, True) is not False:
        out.append(Finding(WARNING, K.OPTIMIZER, "no optimizer block with ZeRO-Offload: a client optimizer other than "
                           "DeepSpeedCPUAdam/DeepSpeedCPULion raises ZeRORuntimeException",
                           f'add "{K.OPTIMIZER}": {{"{K.TYPE}": "AdamW", ...}} or pass DeepSpeedCPUAdam'))
    if opt and isinstance(opt.get(K.PARAMS), dict) and K.MAX_GRAD_NORM in opt[K.PARAMS]:
        out.append(Finding(ERROR, f"{K.OPTIMIZER}.{K.PARAMS}.{K.MAX_GRAD_NORM}", "DeepSpeed raises on it",
                           f"use top-level {K.GRADIENT_CLIPPING}"))
    untested = (opt is not None and typ.lower() not in _ZERO_SUPPORTED_TYPES) or eight
    if stage > 0 and untested and cfg.get(K.ALLOW_UNTESTED_OPTIMIZER) is not True:
        out.append(Finding(ERROR, K.ALLOW_UNTESTED_OPTIMIZER, f"optimizer {typ or optimizer!r} is not in DeepSpeed's "
                           "ZeRO-supported list; deepspeed.initialize asserts", f'set "{K.ALLOW_UNTESTED_OPTIMIZER}": true'))
    return out


def _quant_storage(dtype: str, quant_storage: str | None, where: str) -> list[Finding]:
    q = (quant_storage or "").replace("torch.", "")
    if q == dtype:
        return []
    problem = (f"QLoRA under {where} shards the 4-bit weights with the other parameters, so "
               f"bnb_4bit_quant_storage must be {dtype} (the sharded param dtype); it is {q or 'unset (uint8)'} "
               "(\"Cannot flatten integer dtype tensors\")")
    return [Finding(ERROR, "bnb_4bit_quant_storage", problem,
                    f"BitsAndBytesConfig(bnb_4bit_quant_storage=torch.{dtype}), then pass --quant-storage {dtype}")]


def check_accelerate(cfg: dict, *, base_dir: Path = Path("."), method: str | None = None,
                     quant_storage: str | None = None, optimizer: str | None = None,
                     wrap_class: str | None = None, heads: tuple[int, int] | None = None) -> list[Finding]:
    """Lint an accelerate config dict; follows deepspeed_config_file (relative to base_dir or cwd).
    heads: the model's (attention heads, kv heads) when known (the mesh's tp must divide them)."""
    out: list[Finding] = []
    if not isinstance(cfg, dict):
        return [Finding(ERROR, "<top level>", "not a YAML mapping", "write `key: value` lines")]
    _accelerate_unknown(cfg, out)
    n_hand = len(out)
    dt = cfg.get("distributed_type")
    n, m = cfg.get("num_processes"), cfg.get("num_machines", 1)
    if dt is None:
        out.append(Finding(ERROR, "distributed_type", "missing", "set DEEPSPEED, FSDP, MULTI_GPU or NO"))
    if isinstance(n, int) and isinstance(m, int) and m > 0 and n % m:
        out.append(Finding(ERROR, "num_processes", f"{n} is not divisible by num_machines {m}",
                           f"use a multiple of {m} (total processes over all machines)"))
    mp = cfg.get("mixed_precision")
    if dt == "DEEPSPEED":
        ds = cfg.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            conflicts = [k for k in DS_FILE_CONFLICTS if k in ds] + (["mixed_precision"] if mp not in (None, "no") else [])
            for k in conflicts:
                out.append(Finding(ERROR, k, "accelerate refuses it next to deepspeed_config_file",
                                   "delete it here; set it in the DeepSpeed JSON"))
            from shardtrain.emit.check_hf import resolve_ref
            p = resolve_ref(str(ds["deepspeed_config_file"]), base_dir / "accelerate.yaml",
                            "deepspeed_config.deepspeed_config_file", out)
            if p is not None:
                ws = n if isinstance(n, int) and n > 0 else None
                from shardtrain.config.safe_io import load_mapping
                ds_json = load_mapping(p, fmt="json", what="deepspeed_config_file",
                                       fix="point deepspeed_config.deepspeed_config_file at a DeepSpeed JSON")
                out += [Finding(f.severity, f"{p.name}: {f.key}", f.problem, f.fix) for f in check_deepspeed(
                    ds_json, consumer="accelerate", world_size=ws, optimizer=optimizer,
                    method=method, quant_storage=quant_storage, heads=heads)]
        else:
            stage = int(ds.get("zero_stage", 2) or 0)
            if ds.get("offload_param_device", "none") != "none" and stage < 3:
                out.append(Finding(ERROR, "deepspeed_config.offload_param_device", f"needs zero_stage 3 (is {stage})",
                                   "set zero_stage: 3 or offload_param_device: none"))
            for dev, path in (("offload_param_device", "offload_param_nvme_path"),
                              ("offload_optimizer_device", "offload_optimizer_nvme_path")):
                if ds.get(dev) == "nvme" and ds.get(path) in (None, "", "none"):
                    out.append(Finding(ERROR, f"deepspeed_config.{path}", "nvme offload without a path",
                                       "set it to a local NVMe directory"))
            if (optimizer == "adamw8bit") and ds.get("offload_optimizer_device", "none") != "none":
                out += _optimizer({K.OPTIMIZER: {K.TYPE: "AdamW8bit"}, K.ALLOW_UNTESTED_OPTIMIZER: True}, stage,
                                  {K.DEVICE: ds["offload_optimizer_device"]}, optimizer)
            if method == "qlora" and stage == 3:
                out += _quant_storage(_DTYPE_OF.get(mp, "float32"), quant_storage, "ZeRO-3")
    if dt == "FSDP":
        f = cfg.get("fsdp_config") or {}
        v = f.get("fsdp_version", 1)
        if v != 2:
            out.append(Finding(WARNING, "fsdp_config.fsdp_version", f"{v!r}: FSDP1 (deprecated in torch)",
                               "set fsdp_version: 2 (FSDP2, fully_shard)"))
        if v == 2 and not isinstance(f.get("fsdp_reshard_after_forward", True), bool):
            out.append(Finding(ERROR, "fsdp_config.fsdp_reshard_after_forward", "FSDP2 takes true/false, not a "
                               "sharding strategy name", "true for FULL_SHARD, false for SHARD_GRAD_OP"))
        if v == 2 and f.get("fsdp_forward_prefetch"):
            out.append(Finding(ERROR, "fsdp_config.fsdp_forward_prefetch", "not implemented in FSDP2", "delete it"))
        if f.get("fsdp_cpu_ram_efficient_loading") and not f.get("fsdp_sync_module_states"):
            out.append(Finding(ERROR, "fsdp_config.fsdp_sync_module_states", "must be true with "
                               "fsdp_cpu_ram_efficient_loading (accelerate launch raises)", "set it to true"))
        if f.get("fsdp_auto_wrap_policy") == "TRANSFORMER_BASED_WRAP":
            cls = f.get("fsdp_transformer_layer_cls_to_wrap")
            if wrap_class and cls and wrap_class not in str(cls).split(","):
                out.append(Finding(ERROR, "fsdp_config.fsdp_transformer_layer_cls_to_wrap", f"{cls!r} is not the "
                                   f"model's decoder layer ({wrap_class}): 'Could not find the transformer layer class'",
                                   f"set it to {wrap_class}"))
        if optimizer == "adamw8bit":
            out.append(Finding(ERROR, "optimizer", "bitsandbytes 8-bit optimizers do not handle FSDP2 DTensor "
                               "shards", "use AdamW with FSDP, or DeepSpeed ZeRO with adamw8bit"))
        if method == "qlora":
            out += _quant_storage(_DTYPE_OF.get(mp, "float32"), quant_storage, "FSDP")
    from shardtrain.emit.check_mesh import accelerate_mesh
    out += accelerate_mesh(cfg, heads)
    if not any(f.severity == ERROR for f in out[n_hand:]) and not any(f.severity == ERROR and "." not in f.key
                                                                       for f in out[:n_hand]):
        # nothing found by hand: ask accelerate's own launcher and FSDP plugin (engine_schema)
        out += [Finding(r.severity, S._dotted(r.path), r.problem, r.fix) for r in S.accelerate_launch_errors(cfg)]
    return out


def load_any(path: str | Path) -> tuple[str, object]:
    """(kind, content) of any file `shardtrain emit` writes (emit/check_bundle.py Kind; a str enum, so
    "deepspeed" / "accelerate" compare equal): text kinds (launch.sh, hostfile, README.md) give the text,
    the others the parsed mapping."""
    from shardtrain.config.safe_io import load_file, read_text  # any bad file -> one ConfigError (a ValueError)
    from shardtrain.emit.check_bundle import Kind, kind_of_mapping, kind_of_text
    p = Path(path)
    fix = "give a file `shardtrain emit --out DIR` writes (DeepSpeed JSON, accelerate YAML, fsdp.json, " \
          "trainer_args.json, ...) or your own DeepSpeed JSON / accelerate YAML"
    kind = kind_of_text(p, read_text(p, "config", fix))
    if kind is not None:
        return kind, read_text(p, "config", fix)
    data = load_file(p, fmt="auto", what="config", fix=fix)
    if not isinstance(data, dict):
        raise ValueError(f"config '{p}': the top level must be a mapping (a JSON object), got {type(data).__name__}; "
                         "give a DeepSpeed JSON or an accelerate YAML")
    kind = kind_of_mapping(data)
    if kind is Kind.ACCELERATE:
        from shardtrain.config.safe_io import check_accelerate_shape
        check_accelerate_shape(data, p)
    return kind, data
