"""Count the model-state bytes that real training engines hold, per rank and per term.

Run under torchrun on gloo (CPU):

    DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/truth/engine_bytes.py OUT_DIR \
        [--model tiny-llama] [--model8 PATH/config.json] [--scenarios ddp_fp32,zero3,...] \
        [--ds-configs configs.json]

For each scenario it builds the model from the preset config.json with transformers (random init,
fixed seed), wraps it with the engine (torch DDP, FSDP2 ``fully_shard``, DeepSpeed ZeRO-1/2/3 with
and without CPU offload), runs two real optimizer steps and, during the second one, walks the real
objects — module parameters (ZeRO-3: the partitioned ``ds_tensor``), ``.grad``s, every tensor
reachable from the ZeRO optimizer (``single_partition_of_fp32_groups``, ``averaged_gradients``,
``grad_partitions_flat_buffer``, ipg buckets, ...), ``optimizer.state``, FSDP2 DTensor local
shards — and sums the bytes of the *distinct storages* behind them, attributing each storage to one
term (params > master_params > optimizer_states > grads > buffers; see ``_term``).

Snapshots (each term is reported as its maximum over them, which is what a peak needs):
  late_backward  - a hook on the embedding output's gradient: every other gradient exists and the
                   reduce buckets are live
  epilogue       - ZeRO only: entry of ``independent_gradient_partition_epilogue``, the end of
                   backward before DeepSpeed clears the gradients it kept outside its buckets
  post_backward  - after backward, before the optimizer step
  grad_convert   - ZeRO-1/2 only: in ``free_grad_in_param_list(params_in_partition)``, the moment
                   the fp32 gradient partition and the 16-bit gradients both exist
  inner_step     - a step pre-hook on the wrapped torch/DeepSpeedCPUAdam/bitsandbytes optimizer:
                   fp32 grad partition, master weights and (from step 1) optimizer states exist

With optimizer offload, DeepSpeed puts some tensors on the host (``device='cpu'``) and the rest on
the accelerator; on a CPU-only machine both are host memory, so placement is taken from the engine's
own code paths (``_HOST_OPT``, ``_HOST_PARAM``: what DeepSpeed allocates on ``self.device = 'cpu'``)
and reported as a separate ``host`` figure. ZeRO-3 parameters gathered for compute (not persistent)
count as buffers, as in the memory model.

Writes ``OUT_DIR/rank{R}.json``: {scenario: {"terms": {...}, "host": int, "snapshots": {...},
"tensors": [[path, term, bytes, dtype, host], ...], "meta": {...}}}.
"""
from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from shardtrain.config.presets import load_model_config  # noqa: E402

TERMS = ("params", "master_params", "optimizer_states", "grads", "buffers")
SEQ = 16
MICRO = 2
LORA_RANK = 8
ALL_SCENARIOS = (
    "ddp_fp32", "ddp_bf16", "ddp_lora", "ddp_adamw8bit", "ddp_adamw8bit_large",
    "fsdp_full_shard", "fsdp_shard_grad_op", "fsdp_lora",
    "zero1", "zero2", "zero3", "zero1_fp32", "zero2_fp32", "zero3_fp32",
    "zero2_offload", "zero3_offload", "zero2_offload_fp32", "zero3_offload_fp32", "zero3_lora",
    "fsdp_full_shard_large", "zero2_large", "zero3_large",
)

# ----------------------------------------------------------------------------------- counting

_PARAM_PAT = re.compile(r"^module\.|\.ds_tensor|bit16_groups_flat|parallel_partitioned_bit16_groups|"
                        r"(^|\.)bit16_groups\[|round_robin_bit16_groups\[|fp16_groups\[|"
                        r"fp16_partitioned_groups(_flat)?\[|lp_param_buffer|"
                        r"param_groups_fp16_flat_cpu_memory")
_MASTER_PAT = re.compile(r"(single_partition_of_fp32_groups|fp32_partitioned_groups_flat)\[\d+\]$|"
                         r"^inner\.param_groups\[\d+\]\.params\[\d+\]$")
_STATE_PAT = re.compile(r"^inner\.state\[")
_GRAD_PAT = re.compile(r"\.grad$|\.grad\b|grad_accum|averaged_gradients|grads_in_partition|"
                       r"grad_partitions_flat_buffer|_param_id_to_grad_partition|all_grad_tensors|"
                       r"accumulated_grads_in_cpu|_grad_partition")
# DeepSpeed optimizer offload: what the engine allocates with device=self.device ('cpu') or pins on
# the host (stage_1_and_2.py __init__/initialize_optimizer_states, stage3.py
# _create_fp32_partitions / _setup_for_real_optimizer / _create_param_groups_fp16_flat_cpu_memory).
_HOST_OPT = re.compile(r"single_partition_of_fp32_groups|fp32_partitioned_groups_flat|^inner\.state\[|"
                       r"^inner\.param_groups|param_buffer_of_bit16_for_cpu_offload_groups|"
                       r"temp_grad_buffer_for_cpu_offload|accumulated_grads_in_cpu|"
                       r"grad_partitions_flat_buffer|_param_id_to_grad_partition|averaged_gradients")
_HOST_PARAM = re.compile(r"\.ds_tensor|fp16_partitioned_groups|param_groups_fp16_flat_cpu_memory")


_IPG_BUFFER = re.compile(r"ipg_buckets\[[^\]]*\]\.buffer(\[\d+\])?$")


def _term(path: str) -> str:
    if _IPG_BUFFER.search(path) or path.startswith("gathered."):
        # reduce buckets (a gradient may be a view into one) and ZeRO-3 params gathered for compute
        return "buffers"
    if _MASTER_PAT.search(path):
        return "master_params"
    if _STATE_PAT.search(path):
        return "optimizer_states"
    if _GRAD_PAT.search(path):
        return "grads"
    if _PARAM_PAT.search(path):
        return "params"
    return "buffers"


def _local(t: torch.Tensor) -> torch.Tensor:
    try:
        from torch.distributed.tensor import DTensor
        if isinstance(t, DTensor):
            return t._local_tensor
    except ImportError:  # pragma: no cover
        pass
    return t


def _walk(root, name: str, out: list, seen: set, max_depth: int = 8) -> None:
    """Collect (path, tensor) for every tensor reachable from `root` through containers and the
    attributes of DeepSpeed / torch.optim / bitsandbytes / FSDP objects (never through modules)."""
    stack = [(root, name, 0)]
    while stack:
        obj, path, d = stack.pop()
        if obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        if isinstance(obj, torch.Tensor):
            # every path to a tensor is recorded (the term is chosen per storage later) ...
            out.append((path, obj))
            loc = _local(obj)
            if loc is not obj:
                out.append((path, loc))
        key = id(obj)
        if key in seen:
            continue
        seen.add(key)
        if isinstance(obj, torch.Tensor):  # ... but its attributes are walked once
            if obj.is_leaf and obj.grad is not None:
                stack.append((obj.grad, path + ".grad", d + 1))
            for k, v in getattr(obj, "__dict__", {}).items():
                if isinstance(v, (torch.Tensor, list, tuple, dict)):
                    stack.append((v, f"{path}.{k}", d + 1))
            continue
        if d > max_depth or isinstance(obj, torch.nn.Module):
            continue
        if isinstance(obj, dict):
            for i, (k, v) in enumerate(list(obj.items())):
                kk = f"{k}" if isinstance(k, (str, int)) else f"#{i}"
                stack.append((v, f"{path}[{kk}]", d + 1))
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            for i, v in enumerate(list(obj)):
                stack.append((v, f"{path}[{i}]", d + 1))
        elif hasattr(obj, "__dict__"):
            mod = type(obj).__module__ or ""
            if mod.startswith(("deepspeed", "torch.optim", "bitsandbytes", "torch.distributed.fsdp")):
                for k, v in vars(obj).items():
                    stack.append((v, f"{path}.{k}", d + 1))


def _storage(t: torch.Tensor):
    t = _local(t)
    if t.device.type == "meta":
        return None
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if s.nbytes() == 0 or s.data_ptr() == 0:
        return None
    return s.data_ptr(), s.nbytes()


class Counter:
    """Snapshots of distinct tensor storages per term, and the per-term maximum over snapshots."""

    def __init__(self, offload_opt: bool = False, offload_param: bool = False):
        self.offload_opt, self.offload_param = offload_opt, offload_param
        self.snaps: dict[str, dict] = {}
        self.tensors: dict[str, list] = {}

    def is_host(self, path: str) -> bool:
        if self.offload_opt and _HOST_OPT.search(path) and not path.startswith("module."):
            return True
        return bool(self.offload_param and _HOST_PARAM.search(path))

    def snapshot(self, label: str, module, optimizer, inner=None) -> None:
        found: list = []
        seen: set = set()
        for n, p in module.named_parameters():
            # ZeRO-3: a non-persistent param's full data is a transient all-gather (buffers);
            # persistent ones (ds_persist) stay gathered for the whole run (params)
            gathered = hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)
            found.append((f"gathered.{n}" if gathered else f"module.{n}", p))
            loc = _local(p)
            if loc is not p:
                found.append((f"module.{n}", loc))
            g = p.grad
            if g is not None:
                found.append((f"param.{n}.grad", g))
                found.append((f"param.{n}.grad", _local(g)))
            for k, v in getattr(p, "__dict__", {}).items():
                if isinstance(v, torch.Tensor):
                    _walk(v, f"param.{n}.{k}", found, seen)
        if inner is not None:
            _walk(inner, "inner", found, seen)
        if optimizer is not None and optimizer is not inner:
            _walk(optimizer, "opt", found, seen)
        best: dict = {}  # storage -> (priority, path, term, nbytes, dtype, host)
        prio = {t: i for i, t in enumerate(TERMS)}
        buffer_storages = {_storage(t) for path, t in found if _IPG_BUFFER.search(path)}
        for path, t in found:
            st = _storage(t)
            if st is None:
                continue
            term = "buffers" if st in buffer_storages else _term(path)
            host = self.is_host(path)
            cand = (prio[term], path, term, st[1], str(t.dtype), host)
            cur = best.get(st[0])
            if cur is None or cand[0] < cur[0] or (cand[0] == cur[0] and cand[3] > cur[3]):
                best[st[0]] = cand
        terms = {t: 0 for t in TERMS}
        host_terms = {t: 0 for t in TERMS}
        for _, path, term, nb, dt, host in best.values():
            (host_terms if host else terms)[term] += nb
        self.snaps[label] = {"device": terms, "host": host_terms}
        self.tensors[label] = sorted([[p, tm, nb, dt, h] for _, p, tm, nb, dt, h in best.values()],
                                     key=lambda r: -r[2])

    def result(self) -> dict:
        dev = {t: max((s["device"][t] for s in self.snaps.values()), default=0) for t in TERMS}
        host = {t: max((s["host"][t] for s in self.snaps.values()), default=0) for t in TERMS}
        return {"terms": dev, "host_terms": host, "host": sum(host.values()),
                "snapshots": self.snaps,
                "tensors": self.tensors}


# ----------------------------------------------------------------------------------- model

def build_model(model_name: str, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg_dict, _ = load_model_config(model_name)
    cfg_dict = {k: v for k, v in cfg_dict.items() if k not in ("torch_dtype", "dtype")}
    config = AutoConfig.for_model(**cfg_dict)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    if dtype is not torch.float32:
        model.to(dtype)
    return model


def add_lora(model):
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=LORA_RANK, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def batch(vocab: int):
    g = torch.Generator().manual_seed(1234 + dist.get_rank())
    ids = torch.randint(0, vocab, (MICRO, SEQ), generator=g)
    return ids, ids.clone()


def embed_module(model):
    m = model
    for attr in ("module", "base_model", "model"):
        while hasattr(m, attr) and isinstance(getattr(m, attr), torch.nn.Module) and \
                not hasattr(m, "get_input_embeddings"):
            m = getattr(m, attr)
    return m.get_input_embeddings()


def late_backward_hook(model, counter: Counter, label_fn, module, optimizer, inner_fn):
    """Snapshot when the embedding output's gradient is computed (late in backward, step 2)."""
    emb = embed_module(model)

    def fwd_hook(_m, _inp, out):
        if label_fn() and out.requires_grad:
            out.register_hook(lambda g: counter.snapshot("late_backward", module, optimizer, inner_fn()))
        return None
    return emb.register_forward_hook(fwd_hook)


# ----------------------------------------------------------------------------------- engines

def run_torch(scn: str, model_name: str, counter: Counter) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP
    lora = "lora" in scn
    fsdp = scn.startswith("fsdp")
    bf16 = scn != "ddp_fp32"
    if lora:
        # dtype policy (memory.py): frozen base in the compute dtype, adapters fp32
        model = add_lora(build_model(model_name, torch.bfloat16))
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        model = build_model(model_name)
    vocab = model.config.vocab_size
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        reshard = scn != "fsdp_shard_grad_op"
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        for layer in layers:
            fully_shard(layer, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(model, mp_policy=mp, reshard_after_forward=reshard)
        wrapped = model
    else:
        wrapped = DDP(model, gradient_as_bucket_view=True)
    params = [p for p in model.parameters() if p.requires_grad]
    if "adamw8bit" in scn:
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
    step = {"n": 0}
    opt.register_step_pre_hook(
        lambda o, a, k: counter.snapshot("inner_step", model, None, opt) if step["n"] == 2 else None)
    h = late_backward_hook(model, counter, lambda: step["n"] == 2, model, None, lambda: opt)
    losses = []
    for i in (1, 2):
        step["n"] = i
        ids, labels = batch(vocab)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and not fsdp):
            loss = wrapped(input_ids=ids, labels=labels).loss
        loss.backward()
        if i == 2:
            counter.snapshot("post_backward", model, None, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    h.remove()
    return {"losses": losses, "trainable": sum(p.numel() for p in params),
            "num_params": sum(_local(p).numel() for p in model.parameters())}


def ds_config(scn: str, hidden: int) -> dict:
    """What shardtrain.emit.deepspeed.deepspeed_config emits for this strategy (the pytest passes
    the emitter's own output with --ds-configs; this copy serves standalone runs)."""
    stage = int(re.search(r"zero(\d)", scn).group(1))
    fp32 = scn.endswith("_fp32")
    offload = "offload" in scn
    h2 = hidden * hidden
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": h2}
    if stage < 3:
        zero.update({"reduce_scatter": True, "allgather_partitions": True, "allgather_bucket_size": h2})
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": int(0.9 * h2),
                     "stage3_param_persistence_threshold": 10 * hidden,
                     "stage3_max_live_parameters": 10**9, "stage3_max_reuse_distance": 10**9})
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    opt_params = {"lr": 1e-3, "weight_decay": 0.0}
    if not offload:
        opt_params["torch_adam"] = True
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1,
           "train_batch_size": MICRO * dist.get_world_size(), "gradient_clipping": 1.0,
           "optimizer": {"type": "AdamW", "params": opt_params},
           "zero_optimization": zero, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    if not fp32:
        cfg["bf16"] = {"enabled": True}
    return cfg


def run_deepspeed(scn: str, model_name: str, counter: Counter, configs: dict) -> dict:
    import deepspeed
    lora = "lora" in scn
    if lora:
        model = add_lora(build_model(model_name, torch.bfloat16))
    else:
        model = build_model(model_name)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    cfg = configs[scn] if scn in configs else ds_config(scn, hidden)
    assert cfg["train_micro_batch_size_per_gpu"] == MICRO, cfg
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=cfg)
    zopt = engine.optimizer
    inner = zopt.optimizer
    step = {"n": 0}
    inner.register_step_pre_hook(
        lambda o, a, k: counter.snapshot("inner_step", engine.module, zopt, inner) if step["n"] == 2 else None)
    if hasattr(zopt, "free_grad_in_param_list") and hasattr(zopt, "params_in_partition"):
        orig = zopt.free_grad_in_param_list

        def free_grad(param_list, *a, **k):
            if step["n"] == 2 and param_list is zopt.params_in_partition[0]:
                counter.snapshot("grad_convert", engine.module, zopt, inner)
            return orig(param_list, *a, **k)
        zopt.free_grad_in_param_list = free_grad
    if hasattr(zopt, "independent_gradient_partition_epilogue"):
        orig_epi = zopt.independent_gradient_partition_epilogue

        def epilogue(*a, **k):  # every gradient of the backward exists, none cleared yet
            if step["n"] == 2:
                counter.snapshot("epilogue", engine.module, zopt, inner)
            return orig_epi(*a, **k)
        zopt.independent_gradient_partition_epilogue = epilogue
    h = late_backward_hook(engine.module, counter, lambda: step["n"] == 2, engine.module, zopt, lambda: inner)
    losses = []
    for i in (1, 2):
        step["n"] = i
        ids, labels = batch(vocab)
        loss = engine(input_ids=ids, labels=labels).loss
        engine.backward(loss)
        if i == 2:
            counter.snapshot("post_backward", engine.module, zopt, inner)
        engine.step()
        losses.append(float(loss))
    h.remove()
    meta = {"losses": losses, "inner_optimizer": type(inner).__name__,
            "param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
            "trainable": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())}
    try:
        engine.destroy()
    except Exception as e:  # pragma: no cover - older DeepSpeed
        meta["destroy_error"] = repr(e)
    return meta


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--model8", default=None, help="config for the *_large scenarios")
    ap.add_argument("--scenarios", default=",".join(ALL_SCENARIOS))
    ap.add_argument("--ds-configs", type=Path, default=None,
                    help="JSON {scenario: DeepSpeed config} (the emitter's output)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results: dict = {}
    configs = json.loads(args.ds_configs.read_text()) if args.ds_configs else {}
    scenarios = [s for s in args.scenarios.split(",") if s]
    ds_inited = False
    for scn in scenarios:
        t0 = time.time()
        offload = "offload" in scn
        counter = Counter(offload_opt=offload, offload_param=offload and "zero3" in scn)
        model_name = args.model8 if scn.endswith("_large") else args.model
        if scn.startswith("zero"):
            if not ds_inited:
                import deepspeed
                from shardtrain.runtime.dist import _unlink_deepspeed_shm
                deepspeed.init_distributed(dist_backend="gloo")
                _unlink_deepspeed_shm()   # else one /dev/shm segment per rank is left (runtime/dist.py)
                ds_inited = True
            meta = run_deepspeed(scn, model_name, counter, configs)
        else:
            meta = run_torch(scn, model_name, counter)
        res = counter.result()
        res["meta"] = {**meta, "seconds": round(time.time() - t0, 2), "model": model_name}
        results[scn] = res
        gc.collect()
        dist.barrier()
        if rank == 0:
            print(f"[engine_bytes] {scn}: {res['terms']} host={res['host']} "
                  f"({res['meta']['seconds']} s)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
