"""Model-state bytes on this rank, counted from the real engine objects with the memory model's
definitions (compiler/memory.py) — the same counting the compiler was calibrated with
(tests/truth/engine_bytes.py):

Every tensor reachable from the module's parameters (and their `.grad` / quantisation state), the
wrapped optimizer (DeepSpeed ZeRO optimizer attributes: `single_partition_of_fp32_groups`,
`averaged_gradients`, `grads_in_partition`, `grad_partitions_flat_buffer`, ipg buckets, ...) and the
base optimizer's state is collected; each distinct *storage* is attributed to one term by the path it
was reached through (params > master_params > optimizer_states > grads > buffers) and counted once.
Snapshots during the first optimizer steps — late in backward (the embedding output's gradient),
after backward, DeepSpeed's gradient conversion / epilogue, and just before the base optimizer's
step — give each term its maximum. With ZeRO-Offload, what DeepSpeed allocates on the host
(`device='cpu'` or pinned) is reported separately ("offloaded").
"""
from __future__ import annotations

import collections
import re

import torch

from shardtrain.compiler.specs import Engine
from shardtrain.runtime.modeling import find_embeddings

TERMS = ("params", "master_params", "optimizer_states", "grads", "buffers")
_PARAM = re.compile(r"^module\.|\.ds_tensor|bit16_groups_flat|parallel_partitioned_bit16_groups|"
                    r"(^|\.)bit16_groups\[|round_robin_bit16_groups\[|fp16_groups\[|"
                    r"fp16_partitioned_groups(_flat)?\[|lp_param_buffer|param_groups_fp16_flat_cpu_memory")
_MASTER = re.compile(r"(single_partition_of_fp32_groups|fp32_partitioned_groups_flat)\[\d+\]$|"
                     r"^inner\.param_groups\[\d+\]\.params\[\d+\]$")
_STATE = re.compile(r"^inner\.state\[")
_GRAD = re.compile(r"\.grad$|\.grad\b|grad_accum|accumulated_grad|averaged_gradients|grads_in_partition|"
                   r"grad_partitions_flat_buffer|_param_id_to_grad_partition|all_grad_tensors|"
                   r"accumulated_grads_in_cpu|_grad_partition")
_HOST_OPT = re.compile(r"single_partition_of_fp32_groups|fp32_partitioned_groups_flat|^inner\.state\[|"
                       r"^inner\.param_groups|param_buffer_of_bit16_for_cpu_offload_groups|"
                       r"temp_grad_buffer_for_cpu_offload|accumulated_grads_in_cpu|"
                       r"grad_partitions_flat_buffer|_param_id_to_grad_partition|averaged_gradients")
_HOST_PARAM = re.compile(r"\.ds_tensor|fp16_partitioned_groups|param_groups_fp16_flat_cpu_memory")
_IPG = re.compile(r"ipg_buckets\[[^\]]*\]\.buffer(\[\d+\])?$")
_WALK_MODULES = ("deepspeed", "torch.optim", "bitsandbytes", "torch.distributed.fsdp", "shardtrain.runtime")


def _term(path: str) -> str:
    if _IPG.search(path) or path.startswith("gathered."):
        return "buffers"
    for term, pat in (("master_params", _MASTER), ("optimizer_states", _STATE), ("grads", _GRAD),
                      ("params", _PARAM)):
        if pat.search(path):
            return term
    return "buffers"


def _local(t):
    return t._local_tensor if hasattr(t, "_local_tensor") else t


def _storage(t):
    t = _local(t)
    if t.device.type == "meta":
        return None
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return None if s.nbytes() == 0 or s.data_ptr() == 0 else (s.data_ptr(), s.nbytes())


def _walk(root, name: str, out: list, seen: set, max_depth: int = 8) -> None:
    """(path, tensor) for every tensor reachable through containers and engine objects (not modules)."""
    stack = [(root, name, 0)]
    while stack:
        obj, path, d = stack.pop()
        if obj is None or isinstance(obj, (str, bytes, int, float, bool)):
            continue
        if isinstance(obj, torch.Tensor):
            out.append((path, obj))
            if _local(obj) is not obj:
                out.append((path, _local(obj)))
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.is_leaf and obj.grad is not None:
                stack.append((obj.grad, path + ".grad", d + 1))
            for k, v in getattr(obj, "__dict__", {}).items():
                if isinstance(v, (torch.Tensor, list, tuple, dict)) or type(v).__name__ == "QuantState":
                    stack.append((v, f"{path}.{k}", d + 1))
            continue
        if d > max_depth or isinstance(obj, torch.nn.Module):
            continue
        if isinstance(obj, dict):
            for i, (k, v) in enumerate(list(obj.items())):
                stack.append((v, f"{path}[{k if isinstance(k, (str, int)) else '#%d' % i}]", d + 1))
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            for i, v in enumerate(list(obj)):
                stack.append((v, f"{path}[{i}]", d + 1))
        elif hasattr(obj, "__dict__") and (type(obj).__module__ or "").startswith(_WALK_MODULES + ("bitsandbytes",)):
            for k, v in vars(obj).items():
                stack.append((v, f"{path}.{k}", d + 1))


def _fsdp_params(module) -> list:
    out = []
    for m in module.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        state = get_state()
        groups = list(getattr(state, "_fsdp_param_groups", None) or [])
        if getattr(state, "_fsdp_param_group", None) is not None:
            groups.append(state._fsdp_param_group)
        for g in groups:
            out += list(getattr(g, "fsdp_params", []) or [])
    return out


class StateMeter:
    """Per-term maximum over snapshots taken while `active` (the first optimizer steps)."""

    def __init__(self, eng):
        self.eng = eng
        ds = eng.kind is Engine.DEEPSPEED
        self.offload_opt = ds and eng.offload_optimizer
        self.offload_param = ds and eng.offload_params
        # FSDP2 CPUOffloadPolicy (fsdp_offload): every sharded param, its grad and the optimizer state are
        # host tensors (on a CPU run device and host are one memory, so attribute by definition)
        self.fsdp_host = eng.kind is Engine.FSDP and getattr(eng, "cpu_offload", False)
        self.zopt = eng.optimizer if ds else None
        self.inner = eng.optimizer.optimizer if ds else eng.optimizer
        self.device = {t: 0 for t in TERMS}
        self.host = {t: 0 for t in TERMS}
        # FSDP2 swaps unsharded params onto the module during forward/backward (transient buffers in
        # the memory model): the sharded DTensor params registered now are the params term
        self.params = list(eng.model.named_parameters())
        # bitsandbytes keeps QLoRA's QuantState (absmax, codes) on the Linear4bit module too: once FSDP2 has
        # replaced the Params4bit by a DTensor shard, that is the only way to it (compiler/memory.py
        # qlora_stats_bytes); it stays on the device, whole
        self.quant_modules = [(n, m) for n, m in eng.model.named_modules()
                              if type(getattr(m, "quant_state", None)).__name__ == "QuantState"]
        self.active = True
        self.largest: list = []   # the biggest storages of the largest snapshot (diagnostics)
        self._largest_total = 0
        self._install()

    def _install(self):
        self.inner.register_step_pre_hook(lambda *_: self.snapshot())
        z = self.zopt
        if z is not None and hasattr(z, "free_grad_in_param_list") and hasattr(z, "params_in_partition"):
            orig = z.free_grad_in_param_list

            def free_grad(param_list, *a, **k):  # fp32 gradient partition and 16-bit grads coexist
                if param_list is z.params_in_partition[0]:
                    self.snapshot()
                return orig(param_list, *a, **k)
            z.free_grad_in_param_list = free_grad
        if z is not None and hasattr(z, "independent_gradient_partition_epilogue"):
            orig_epi = z.independent_gradient_partition_epilogue

            def epilogue(*a, **k):
                self.snapshot()
                return orig_epi(*a, **k)
            z.independent_gradient_partition_epilogue = epilogue
        if z is not None and hasattr(z, "reduce_ipg_grads") and getattr(z, "partition_gradients", False):
            orig_reduce = z.reduce_ipg_grads

            def reduce_ipg(*a, **k):  # ZeRO-2 with accumulation: the new grads_in_partition next to
                out = orig_reduce(*a, **k)   # the previous micro-steps' all_grad_tensors (issue 19)
                self.snapshot()
                return out
            z.reduce_ipg_grads = reduce_ipg
        emb = self._embedding()
        if emb is not None:
            def fwd_hook(_m, _inp, out):  # late in backward: every other gradient exists
                if self.active and torch.is_grad_enabled() and out.requires_grad:
                    out.register_hook(lambda g: self.snapshot())
            # eager even under train.compile=model: dynamo cannot trace the object walk (runtime/compiling.py)
            emb.register_forward_hook(torch.compiler.disable(fwd_hook))

    def _embedding(self):
        return find_embeddings(self.eng.model, "input")

    def snapshot(self):
        if not self.active:
            return
        found, seen = [], set()
        for n, p in self.params:
            gathered = hasattr(p, "ds_tensor") and not getattr(p, "ds_persist", False)
            found.append((f"gathered.{n}" if gathered else f"module.{n}", p))
            if _local(p) is not p:
                found.append((f"module.{n}", _local(p)))
            if p.grad is not None:
                found += [(f"param.{n}.grad", p.grad), (f"param.{n}.grad", _local(p.grad))]
            for k, v in getattr(p, "__dict__", {}).items():
                if isinstance(v, torch.Tensor) or type(v).__name__ == "QuantState":
                    _walk(v, f"module.{n}.{k}", found, seen)
        for n, m in self.quant_modules:
            _walk(m.quant_state, f"module.{n}.quant_state", found, seen)
        if getattr(self.eng, "defer_sync", False):
            # FSDP2 set_requires_gradient_sync(False): unsharded gradients held between micro-steps
            for i, fp in enumerate(_fsdp_params(self.eng.model)):
                found.append((f"fsdp[{i}].unsharded_accumulated_grad", getattr(fp, "unsharded_accumulated_grad", None)))
                up = getattr(fp, "_unsharded_param", None)
                found.append((f"fsdp[{i}].unsharded_param.grad", getattr(up, "grad", None)))
            found = [(p, t) for p, t in found if t is not None]
        _walk(self.inner, "inner", found, seen)
        if self.zopt is not None:
            _walk(self.zopt, "opt", found, seen)
        prio = {t: i for i, t in enumerate(TERMS)}
        ipg = {_storage(t) for path, t in found if _IPG.search(path)}
        best: dict = {}
        for path, t in found:
            st = _storage(t)
            if st is None:
                continue
            term = "buffers" if st in ipg else _term(path)
            host = bool((self.offload_opt and _HOST_OPT.search(path) and not path.startswith("module."))
                        or (self.offload_param and _HOST_PARAM.search(path))
                        or (self.fsdp_host and term != "buffers" and ".quant_state" not in path))
            cand = (prio[term], st[1], term, host, path)
            cur = best.get(st[0])
            if cur is None or cand[0] < cur[0] or (cand[0] == cur[0] and cand[1] > cur[1]):
                best[st[0]] = cand
        dev, host = {t: 0 for t in TERMS}, {t: 0 for t in TERMS}
        for _, nb, term, h, _path in best.values():
            (host if h else dev)[term] += nb
        total = sum(dev.values()) + sum(host.values())
        if total > self._largest_total:
            self._largest_total = total
            self.largest = sorted(([path, term, nb, "host" if h else "device"]
                                   for _, nb, term, h, path in best.values()), key=lambda r: -r[2])[:12]
        for t in TERMS:
            self.device[t] = max(self.device[t], dev[t])
            self.host[t] = max(self.host[t], host[t])

    # the loop's hooks (snapshots happen in the engine hooks above)
    def after_micro_backward(self):
        self.snapshot()

    def after_step(self):
        self.snapshot()

    def report(self) -> tuple[dict, dict]:
        """(device terms, offloaded host terms), without the comm buffers (reported separately)."""
        dev = {k: v for k, v in self.device.items() if k != "buffers"}
        host = {k: v for k, v in self.host.items() if v}
        return dev, host

    @property
    def buffers(self) -> int:
        return self.device["buffers"]


def live_bytes(eng) -> int:
    """Cheap per-phase figure for CPU runs: distinct storages of params, grads and optimizer state."""
    seen, n = set(), 0
    opt = eng.optimizer
    inner = getattr(opt, "optimizer", None) if eng.kind is Engine.DEEPSPEED else opt
    tensors = [t for p in eng.model.parameters() for t in (p, p.grad)]
    for st in getattr(inner if inner is not None else opt, "state", {}).values():
        tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
    if eng.kind is Engine.DEEPSPEED:
        tensors += list(getattr(opt, "single_partition_of_fp32_groups", None) or
                        getattr(opt, "fp32_partitioned_groups_flat", None) or [])
    for t in tensors:
        if t is None:
            continue
        s = _storage(getattr(t, "ds_tensor", None) if getattr(t, "ds_tensor", None) is not None else t)
        if s and s[0] not in seen:
            seen.add(s[0])
            n += s[1]
    return n
