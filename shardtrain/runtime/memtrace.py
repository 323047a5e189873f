"""`run.memory_trace: true`: the real-mode peak of live tensors per phase of the measured step.

PyTorch's own tracker (torch/distributed/_tools/mem_tracker.py `MemTracker`, a TorchDispatchMode
that follows every storage an op creates until it is freed, and categorises it by what created
it) runs around one optimizer step; FSDP2 engines use its subclass `FSDPMemTracker`
(fsdp2_mem_tracker.py), which also attributes all-gather / reduce-scatter buffers and unsharded
params. Phases, the same names the compiler's phase model uses:

    forward    from the first micro-batch to the loss (incl. the fp32 logits path); K micro-steps
               give K forwards, the phase peak is their maximum
    backward   loss.backward (DeepSpeed: engine.backward incl. its gradient reduction)
    optimizer  clip + optimizer step + zero_grad (DeepSpeed: engine.step at the boundary)

The tracker only knows storages it saw created, so everything that exists before the step is
registered first: for DDP / single device the module (params, grads, buffers) and the optimizer
(states) through `track_external`; for DeepSpeed the engine objects walked like
shardtrain.runtime.state_bytes (flat 16-bit partitions, fp32 master partitions, gradient
partitions, ipg buckets), each categorised by the same path rules. Tensors allocated while the
lm_head runs and the loss is computed are recorded as "Logits" (the plan's `logits` term); those a
process-group backend allocates inside a collective as "Comm temp" (see COLLECTIVES).

There is no public way to restart a tracker's peak or file a pre-existing storage under a category,
so this uses the trackers' private `_peak_mem`, `_peak_mem_snap`, `_update_and_maybe_create_winfos`,
`_param_to_grad_hook_handles` and `_ref_class` (torch 2.13); tests/test_memtrace.py fails if they change.
Nothing here runs when the key is off (the worker does not even import this module).
"""
from __future__ import annotations

import copy
import logging
from contextlib import contextmanager

import torch

from shardtrain.compiler.specs import Engine
from shardtrain.runtime.modeling import find_embeddings

log = logging.getLogger("shardtrain.worker")
PHASES = ("forward", "backward", "optimizer")
_TOTAL = "Total"

# tracker category (value of the _RefType enums, plus ours) -> the plan's term it is compared with
CATEGORY_TERM = {
    "Parameter": "params", "Sharded Param": "params",
    "Gradient": "grads", "Sharded Grad": "grads", "Unsharded Grad": "grads",
    "Master": "master_params",
    "Optstate": "optimizer_states", "OptState": "optimizer_states",
    "Activation": "activations", "Temp": "activations", "Inputs": "activations",
    "Logits": "logits",
    "Buffer": "buffers", "Unsharded Param": "buffers", "All Gather": "buffers", "Reduce Scatter": "buffers",
    "Other": "buffers",
    "Comm temp": "comm_temp",
}
TERMS = ("params", "grads", "master_params", "optimizer_states", "activations", "logits", "buffers", "comm_temp")
# Tensors a CPU (gloo) collective allocates inside the call: ProcessGroupGloo's reduce-scatter copies
# FSDP2's flat gradient input (measured: 131 MB, the root unit's fp32 embedding + lm_head gradients of
# tests/fixtures/models/small-llama-32k.json at world size 2) while NCCL reduce-scatters in place. The
# plan and the trace model NCCL, so "comm_temp" is reported apart and "no_comm_temp" holds the peaks
# without it (a second running peak, not the peak minus comm_temp).
COLLECTIVES = ("reduce_scatter_single", "all_gather_single", "reduce_scatter_tensor", "all_gather_into_tensor",
               "all_reduce", "all_gather", "reduce_scatter", "broadcast", "_reduce_scatter_base",
               "_all_gather_base")


def _extended_refs(base):
    """The tracker's category enum plus "Logits" and "Master" (members compare and hash by value, so
    the tracker's own `_MemRefType.ACT` keys still index the snapshot dicts)."""
    from torch.distributed._tools.mem_tracker import _RefType
    members = {m.name: m.value for m in base}
    members.update(LOGITS="Logits", MASTER="Master", COMM="Comm temp")
    return _RefType("STRefType", members)


def _make_tracker(eng):
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class _Logits:
        """Mixin: ACT storages created in the logits region are filed under "Logits"; storages the
        process-group backend creates inside a collective call under "Comm temp"."""
        in_logits = False
        in_comm = False

        def _update_peak_stats(self, peak_state):
            # a second running peak without the backend's collective temporaries (see COLLECTIVES)
            super()._update_peak_stats(peak_state)
            for dev, snap in self._curr_mem_snap.items():
                v = snap[_TOTAL] - snap.get(self._comm_key, 0)
                if v > self.nc_peak.get(dev, -1):
                    self.nc_peak[dev] = v
                    self.nc_snap[dev] = dict(snap)

        def _track(self, reftype, t):
            if self.in_comm and reftype.value in ("Activation", "Temp"):
                reftype = self._ref_class("Comm temp")
            elif self.in_logits and reftype.value == "Activation":
                reftype = self._ref_class("Logits")
            return super()._track(reftype, t)

    if eng.kind is Engine.FSDP:
        class Tracker(_Logits, FSDPMemTracker):
            pass
        mt = Tracker(eng.model, eng.optimizer)
        from torch.distributed._tools.fsdp2_mem_tracker import _FSDPRefType
        mt._ref_class = _extended_refs(_FSDPRefType)
    else:
        class Tracker(_Logits, MemTracker):
            pass
        mt = Tracker()
        mt._ref_class = _extended_refs(_MemRefType)
    mt._comm_key = mt._ref_class("Comm temp")
    mt.nc_peak, mt.nc_snap = {}, {}
    return mt


@contextmanager
def _flag_collectives(mt):
    """While a torch.distributed collective runs, new storages are the backend's temporaries."""
    import torch.distributed as dist
    saved = {n: getattr(dist, n) for n in COLLECTIVES if hasattr(dist, n)}

    def wrap(f):
        def inner(*a, **k):
            prev, mt.in_comm = mt.in_comm, True
            try:
                return f(*a, **k)
            finally:
                mt.in_comm = prev
        return inner
    for n, f in saved.items():
        setattr(dist, n, wrap(f))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(dist, n, f)


class _NoHook:
    def remove(self) -> None:
        pass


def _register_existing(mt, eng) -> None:
    """Storages that exist before the step (see the module docstring)."""
    # MemTracker's pre-forward hook registers a grad hook on every param of a module and raises on
    # frozen ones (LoRA base weights): mark those as already hooked
    for p in eng.model.parameters():
        if not p.requires_grad:
            mt._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    if eng.kind is Engine.FSDP:
        return  # FSDPMemTracker registers sharded params/grads, buffers and optimizer states itself
    ref = mt._ref_class
    if eng.kind is not Engine.DEEPSPEED:
        mt.track_external(eng.model, eng.optimizer)
        return
    from shardtrain.runtime.state_bytes import TERMS as SB_TERMS, _term, _walk
    found, seen = [], set()
    for n, p in eng.model.named_parameters():
        found.append((f"module.{n}", p))
        if p.grad is not None:
            found.append((f"param.{n}.grad", p.grad))
        for k, v in getattr(p, "__dict__", {}).items():
            if isinstance(v, torch.Tensor) or type(v).__name__ == "QuantState":
                _walk(v, f"module.{n}.{k}", found, seen)
    _walk(eng.optimizer.optimizer, "inner", found, seen)
    _walk(eng.optimizer, "opt", found, seen)
    for _n, b in eng.model.named_buffers():
        found.append(("buffer", b))
    cat = {"params": ref("Parameter"), "master_params": ref("Master"), "optimizer_states": ref("Optstate"),
           "grads": ref("Gradient"), "buffers": ref("Other")}
    # the tracker re-files a storage on each registration (last one wins): lowest priority first,
    # priority as in state_bytes (params > master_params > optimizer_states > grads > buffers)
    for term in reversed(SB_TERMS):
        for path, t in found:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and _term(path) == term:
                mt._update_and_maybe_create_winfos(t, cat[term])


def _by_category(snap: dict, device_type: str = "cpu") -> dict:
    """{device: {ref: bytes}} -> {category value: bytes, "total": bytes} on this rank's device type
    (on a GPU, what offloading keeps in host memory is not GPU memory)."""
    out: dict[str, int] = {}
    for dev, dev_snap in snap.items():
        if torch.device(dev).type != device_type:
            continue
        for k, v in dev_snap.items():
            name = k if isinstance(k, str) and not hasattr(k, "value") else k.value
            name = "total" if name == _TOTAL else name
            out[name] = out.get(name, 0) + int(v)
    return out


def by_term(categories: dict) -> dict:
    """Tracker categories folded into the plan's terms (+ total)."""
    out = {t: 0 for t in TERMS}
    for k, v in categories.items():
        if k != "total":
            out[CATEGORY_TERM.get(k, "buffers")] += v
    out["total"] = categories.get("total", sum(out.values()))
    return out


class StepMemTrace:
    """Wraps one optimizer step in a tracker and splits its peak by phase (`phases`)."""

    def __init__(self, engine):
        self.eng = engine
        self.phases: dict[str, dict] = {}
        self.no_comm: dict[str, dict] = {}  # the same without collective temporaries (COLLECTIVES)
        self.tool = ("torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker" if engine.kind is Engine.FSDP
                     else "torch.distributed._tools.mem_tracker.MemTracker")
        self._mt = None
        self._cur: str | None = None

    def _close_phase(self) -> None:
        mt, ph = self._mt, self._cur
        if mt is None or ph is None:
            return
        dt = self.eng.device.type
        peak = _by_category(mt.get_tracker_snapshot("peak"), dt)
        if peak.get("total", 0) > self.phases.get(ph, {}).get("total", -1):
            self.phases[ph] = peak
        nc = _by_category(mt.nc_snap, dt)
        nc["total"] = sum(v for k, v in nc.items() if k not in ("total", "Comm temp"))
        nc.pop("Comm temp", None)
        if nc["total"] > self.no_comm.get(ph, {}).get("total", -1):
            self.no_comm[ph] = nc
        # restart the peaks from what is live now (the tracker keeps one running peak)
        cur = mt.get_tracker_snapshot("current")
        mt._peak_mem_snap = copy.deepcopy(cur)
        mt._peak_mem = {dev: s[_TOTAL] for dev, s in cur.items()}
        mt.nc_snap = {dev: dict(s) for dev, s in cur.items()}
        mt.nc_peak = {dev: s[_TOTAL] - s.get(mt._comm_key, 0) for dev, s in cur.items()}

    def mark(self, phase: str | None) -> None:
        self._close_phase()
        self._cur = phase
        if self._mt is not None and self.eng.kind is Engine.DEEPSPEED:
            # DeepSpeed's gradient partitions / buckets appear during backward (filed as Temp until
            # here): file them by their engine path again for the next phase
            _register_existing(self._mt, self.eng)
        if self._mt is not None:
            self._mt.in_logits = False
            if phase == "forward":
                # the tracker refuses a second root forward in one tracking session (several
                # micro-steps): module statistics are not used here, drop them
                self._mt.reset_mod_stats()

    @contextmanager
    def step(self):
        eng = self.eng
        mt = self._mt = _make_tracker(eng)
        _register_existing(mt, eng)
        saved = {k: getattr(eng, k) for k in ("forward", "backward", "step")}
        own = {k for k in saved if k in vars(eng)}  # instance attributes to put back as they were

        def forward(batch):
            self.mark("forward")
            return saved["forward"](batch)

        def backward(loss, is_last):
            self.mark("backward")
            return saved["backward"](loss, is_last)

        def step(lr):
            self.mark("optimizer")
            return saved["step"](lr)
        eng.forward, eng.backward, eng.step = forward, backward, step
        head = find_embeddings(eng.model, "output")

        def logits_on(*_):  # the forward's lm_head call up to backward (not recomputations in backward)
            mt.in_logits = self._cur == "forward"
        handle = head.register_forward_pre_hook(logits_on) if head else None
        try:
            with mt, _flag_collectives(mt):
                yield self
                self.mark(None)
        finally:
            for k, f in saved.items():
                if k in own:
                    setattr(eng, k, f)
                else:
                    delattr(eng, k)
            if handle is not None:
                handle.remove()
            self._mt = None

    def report(self) -> dict:
        """{"tool", "peak_phase", "total", "per_phase": {phase: {"total", categories..., "terms": {...}}}}."""
        per = {ph: {**cats, "terms": by_term(cats)} for ph, cats in self.phases.items()}
        peak_phase = max(per, key=lambda p: per[p]["total"]) if per else None
        nc = {ph: {**cats, "terms": by_term(cats)} for ph, cats in self.no_comm.items()}
        nc_phase = max(nc, key=lambda p: nc[p]["total"]) if nc else None
        return {"tool": self.tool, "mode": "real", "peak_phase": peak_phase,
                "total": per[peak_phase]["total"] if peak_phase else 0, "per_phase": per,
                # like for like with the plan and the trace (they model NCCL, see COLLECTIVES)
                "no_comm_temp": {"peak_phase": nc_phase, "total": nc[nc_phase]["total"] if nc_phase else 0,
                                 "per_phase": nc}}


