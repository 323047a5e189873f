"""Model-state bytes on this rank, counted from the real engine objects with the memory model's
definitions (shardtrain/compiler/memory.py):

params            every parameter this rank stores: DDP the full module (fp32 trainable, 16-bit /
                  NF4 frozen incl. the 4-bit quantisation state), FSDP2 the local DTensor shards,
                  ZeRO-1/2 the 16-bit module, ZeRO-3 the `ds_tensor` partitions (+ persistent params)
grads             DDP the `.grad` buckets; FSDP2 the sharded grads (+ unsharded accumulation buffers
                  while the sync is deferred); ZeRO the 16-bit grads (stage 1 `.grad`, stage 2
                  `averaged_gradients` partition, stage 3 `grad_partitions_flat_buffer`) plus the fp32
                  gradient partition DeepSpeed builds at step time (measured inside the step)
master_params     ZeRO fp32 partitions (`single_partition_of_fp32_groups` / `fp32_partitioned_groups_flat`)
optimizer_states  the tensors in the (base) optimizer's state
Terms DeepSpeed keeps on the host (offload) are reported under "offloaded" instead.
Shared tensors (e.g. bitsandbytes quantisation maps) are counted once.
"""
from __future__ import annotations

import torch

from shardtrain.compiler.specs import Engine


class Counter:
    """Bytes of the union of memory regions the given tensors view (shared or aliased storage —
    DeepSpeed's flat buffers, views, quantisation maps — is counted once)."""

    def __init__(self):
        self.regions: dict[int, list[tuple[int, int]]] = {}

    def add(self, tensors) -> "Counter":
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor) or t.is_meta:
                continue
            if hasattr(t, "to_local"):
                t = t.to_local()
            if t.numel() == 0:
                continue
            start = t.storage_offset() * t.element_size()
            self.regions.setdefault(t.untyped_storage().data_ptr(), []).append(
                (start, start + t.numel() * t.element_size()))
        return self

    def total(self) -> int:
        n = 0
        for spans in self.regions.values():
            end = -1
            for a, b in sorted(spans):
                if b > end:
                    n += b - max(a, end)
                    end = b
        return n

    def __call__(self, tensors) -> int:
        return Counter().add(tensors).total()


def _quant_state_tensors(p) -> list:
    qs = getattr(p, "quant_state", None)
    out = []
    while qs is not None:
        out += [getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None)]
        qs = getattr(qs, "state2", None)
    return out


def _state_tensors(optimizer) -> list:
    out = []
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                out.append(v)
    return out


def _params(module) -> list:
    out = []
    for p in module.parameters():
        out.append(p)
        out += _quant_state_tensors(p)
    return out


def fsdp_unsharded_grads(module) -> list:
    """FSDP2 accumulation buffers kept while set_requires_gradient_sync(False)."""
    out = []
    for m in module.modules():
        state = getattr(m, "_get_fsdp_state", None)
        group = getattr(state(), "_fsdp_param_group", None) if state else None
        for fp in getattr(group, "fsdp_params", []) or []:
            for name in ("unsharded_accumulated_grad", "_unsharded_accumulated_grad"):
                t = getattr(fp, name, None)
                if isinstance(t, torch.Tensor):
                    out.append(t)
    return out


def params_bytes(eng) -> int:
    c = Counter()
    if eng.kind is Engine.DEEPSPEED and eng.zero_stage == 3:
        ts = []
        for p in eng.model.parameters():
            ts.append(getattr(p, "ds_tensor", None))
            if p.numel() and getattr(p, "ds_persist", False):
                ts.append(p.data)
        return c(ts)
    return c(_params(eng.model))


def grad_tensors(eng) -> tuple[list, list]:
    """(device-resident, host-resident) gradient tensors other than the ZeRO fp32 partitions."""
    ts = [p.grad for p in eng.model.parameters()]
    if eng.kind is not Engine.DEEPSPEED:
        if eng.kind is Engine.FSDP:
            ts += fsdp_unsharded_grads(eng.model)
        return ts, []
    opt = eng.optimizer
    flat = []
    if eng.zero_stage == 3:
        flat.append(getattr(opt, "grad_partitions_flat_buffer", None))
    else:
        avg = getattr(opt, "averaged_gradients", None) or {}
        flat += [g for gs in (avg.values() if isinstance(avg, dict) else avg) for g in (gs or [])]
        flat.append(getattr(opt, "grads_in_partition", None))
    # ZeRO-Offload allocates its gradient partitions on the host (optimizer.device == "cpu")
    return (ts, flat) if eng.offload_optimizer else (ts + flat, [])


def grads_bytes(eng) -> int:
    dev, host = grad_tensors(eng)
    return Counter()(dev) + Counter()(host)


def _master_groups(opt) -> list:
    return list(getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat", None) or [])


def master_bytes(eng) -> int:
    if eng.kind is not Engine.DEEPSPEED:
        return 0
    return Counter()(_master_groups(eng.optimizer))


def states_bytes(eng) -> int:
    opt = eng.optimizer
    base = getattr(opt, "optimizer", None) if eng.kind is Engine.DEEPSPEED else opt
    return Counter()(_state_tensors(base if base is not None else opt))


def live_bytes(eng) -> int:
    return params_bytes(eng) + grads_bytes(eng) + master_bytes(eng) + states_bytes(eng)


class StateMeter:
    """Measures each term during the first optimizer steps: params / master / states after the step,
    16-bit grads after each backward, and (ZeRO) the fp32 gradient partitions inside the optimizer
    step — counting only bytes that do not alias the 16-bit gradient buffers alive at that moment
    (in fp32 runs DeepSpeed may hand the optimizer a view instead of a copy)."""

    def __init__(self, eng):
        self.eng = eng
        self.terms = {"params": 0, "master_params": 0, "optimizer_states": 0}
        self.grads = [0, 0]        # 16-bit (or DDP/FSDP) grads: device, host
        self.fp32_grads = [0, 0]   # ZeRO fp32 partitions at step time: device, host
        self._wrap_ds_step()

    def _wrap_ds_step(self):
        eng = self.eng
        if eng.kind is not Engine.DEEPSPEED:
            return
        base = eng.optimizer.optimizer
        inner = base.step

        def step(*a, **k):
            if self.active:
                dev, host = grad_tensors(eng)
                g32 = [g.grad for g in _master_groups(eng.optimizer)]
                i, pool = (1, host) if eng.offload_optimizer else (0, dev)
                extra = Counter()(pool + g32) - Counter()(pool)
                self.fp32_grads[i] = max(self.fp32_grads[i], extra)
            return inner(*a, **k)
        base.step = step

    active = True

    def after_micro_backward(self):
        dev, host = grad_tensors(self.eng)
        self.grads = [max(self.grads[0], Counter()(dev)), max(self.grads[1], Counter()(host))]

    def after_step(self):
        e = self.eng
        self.terms["params"] = max(self.terms["params"], params_bytes(e))
        self.terms["master_params"] = max(self.terms["master_params"], master_bytes(e))
        self.terms["optimizer_states"] = max(self.terms["optimizer_states"], states_bytes(e))

    def report(self) -> tuple[dict, dict]:
        """(device terms, offloaded terms) as the memory model splits them."""
        e = self.eng
        t = {"params": self.terms["params"], "grads": self.grads[0] + self.fp32_grads[0],
             "master_params": self.terms["master_params"], "optimizer_states": self.terms["optimizer_states"]}
        off: dict[str, int] = {}
        if e.kind is Engine.DEEPSPEED:
            if e.offload_optimizer:
                off = {"grads": self.grads[1] + self.fp32_grads[1], "master_params": t["master_params"],
                       "optimizer_states": t["optimizer_states"]}
                t["master_params"] = t["optimizer_states"] = 0
            if e.offload_params:
                off["params"] = t["params"]
                t["params"] = 0
        return t, off
