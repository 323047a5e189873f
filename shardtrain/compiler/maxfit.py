"""`shardtrain plan --max seq-len | micro-batch | global-batch` (issue 20, point 1): the largest value of
one job key that fits, found by searching over the real planner (``planner.plan``), not by a formula.

"Fits" means: ``plan()`` returns a plan whose chosen candidate fits (the mesh, strategy, checkpointing and
micro batch stay as free or as forced as the caller's TrainSpec leaves them, so the mesh may change with
the value). The search doubles the value until it stops fitting, then bisects between the last fit and the
first miss over multiples of the key's step (the values in between are only probed: planner.first_fit runs
plan()'s search up to its first fit; the value and the next one are planned in full). It ASSUMES fitting
is monotonic in the value (a larger value never needs less memory); in the planner's model this holds in
practice (activations, logits and host RAM only grow with sequence and micro batch), and the result is
checked at its edge: the value fits and value + step does not (both were planned).

What each key keeps fixed (decided here, documented in the report):

- ``seq_len``: everything else, the global batch included. Step: the larger of 1024 and the least common
  multiple with a forced ``parallel.cp`` (cp must divide the sequence).
- ``micro_batch``: gradient accumulation 1 on a pure data-parallel mesh: micro batch m is planned with
  ``micro_batch = m`` and ``global_batch = m × W``, W = world / (forced tp × forced cp). Every mesh is then
  legal; a mesh the planner picks with more tp × cp than forced accumulates (tp × cp) micro-steps. Step 1.
- ``global_batch``: with gradient accumulation the global batch is unbounded by memory, so this is the
  largest G = m × W planned with micro batch m (over multiples of W): one micro-step per rank on a pure
  data-parallel mesh (force ``--tp 1 --cp 1`` to keep it so); a mesh the planner picks with tp × cp > 1
  accumulates tp × cp micro-steps, as for ``micro_batch``. A forced micro batch makes the question moot:
  refused.

Pure: no I/O, no torch.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Callable

from shardtrain.compiler.plan import MEMORY_TERMS, Plan
from shardtrain.compiler.planner import NoFitError, PlanningError, first_fit, plan
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.saver_reasons import PART_WORDS, activation_parts
from shardtrain.compiler.specs import HardwareSpec, TrainSpec
from shardtrain.units import fmt_bytes

SEQ_STEP_TOKENS = 1024
"""Sequence lengths are searched in multiples of this (and of a forced cp)."""
MAX_STEPS = 1 << 17
"""Search cap in steps (seq 134,217,728 tokens; micro batch 131,072): past it the result says "search_cap"."""

TERM_WORDS = {"params": "parameters", "grads": "gradients", "master_params": "fp32 master parameters",
              "optimizer_states": "optimizer states", "activations": "activations", "logits": "logits path",
              "buffers": "buffers", "cuda_context": "CUDA context"}


class MaxKey(str, enum.Enum):
    """The job key `plan --max` searches (CLI spelling as value)."""
    SEQ_LEN = "seq-len"
    MICRO_BATCH = "micro-batch"
    GLOBAL_BATCH = "global-batch"

    @property
    def json_key(self) -> str:
        return self.value.replace("-", "_")

    @property
    def noun(self) -> str:
        return {"seq-len": "seq", "micro-batch": "micro batch", "global-batch": "global batch"}[self.value]


class Limit(str, enum.Enum):
    """What stops the value from growing (the JSON ``limited_by`` is the term name for GPU_TERM)."""
    GPU_TERM = "gpu"
    HOST_RAM = "host_ram"
    NVME = "nvme"
    NO_LEGAL_MESH = "no_legal_mesh"
    SEARCH_CAP = "search_cap"


@dataclass(frozen=True)
class MaxResult:
    key: MaxKey
    value: int
    """The largest value that fits."""
    step: int
    plan: Plan
    """The plan at ``value``."""
    next_value: int | None
    """value + step (None when the search cap stopped the search)."""
    limit: Limit
    term: str
    """GPU_TERM: the largest per-GPU term of the least-memory plan at next_value (a MEMORY_TERMS name);
    else the Limit's value."""
    term_bytes: int
    """Bytes of that term (host RAM / NVMe per node for those limits; 0 without a plan)."""
    next_needs_bytes: int
    """Per-GPU total of the least-memory plan at next_value (0 without a plan)."""
    usable_bytes: int
    """Per-GPU memory the planner may use (GPU memory less headroom)."""
    detail: str = ""
    """The planner's message at next_value (no legal mesh) or its why_not."""
    plans_made: int = 0
    part: str = ""
    """When ``term`` is activations: its largest part (saver_reasons.PART_WORDS: ckpt_inputs, saved_layers,
    layer_recompute, mlp_intermediates), the one a long-context saver would shrink; else empty."""
    part_bytes: int = 0

    @property
    def limited_by(self) -> str:
        return self.term if self.limit is Limit.GPU_TERM else self.limit.value

    def to_json(self) -> dict:
        return {"key": self.key.json_key, "value": self.value, "step": self.step,
                "limited_by": self.limited_by, "limited_by_bytes": int(self.term_bytes),
                "next": self.next_value, "next_needs_bytes": int(self.next_needs_bytes),
                "usable_bytes": int(self.usable_bytes), "detail": self.detail,
                "limited_by_part": self.part or None, "limited_by_part_bytes": int(self.part_bytes)}

    def sentence(self) -> str:
        """"seq 393,216 fits; at 425,984 the activations (31.2 GiB) push ... past ... usable"."""
        n = self.key.noun
        head = f"{n} {self.value:,} fits"
        if self.next_value is None:
            return head + f" (search stopped at its cap of {MAX_STEPS:,} steps; larger values were not tried)"
        at = f"; at {self.next_value:,}"
        if self.limit is Limit.GPU_TERM:
            return (head + f"{at} the smallest plan needs {self.next_needs_bytes:,} bytes "
                    f"({fmt_bytes(self.next_needs_bytes)}) per GPU > {self.usable_bytes:,} "
                    f"({fmt_bytes(self.usable_bytes)}) usable; its largest term: "
                    f"{TERM_WORDS.get(self.term, self.term)} {fmt_bytes(self.term_bytes)}"
                    + (f" (largest part: {PART_WORDS[self.part]} {fmt_bytes(self.part_bytes)})" if self.part else ""))
        if self.limit is Limit.HOST_RAM:
            return head + f"{at} host RAM runs out: {self.detail}"
        if self.limit is Limit.NVME:
            return head + f"{at} NVMe runs out: {self.detail}"
        return head + f"{at} there is no legal mesh: {self.detail}"


class NothingFitsError(PlanningError):
    """Even the smallest value does not fit; carries the smallest value tried and the planner's error."""

    def __init__(self, message: str, key: MaxKey, value: int, cause: PlanningError):
        super().__init__(message)
        self.key, self.value, self.cause = key, value, cause


def data_parallel_width(hw: HardwareSpec, train: TrainSpec) -> int:
    """W: the data-parallel size of the widest mesh the request admits (world / forced tp × forced cp)."""
    req = train.parallel
    return max(1, hw.world_size // ((req.tp or 1) * (req.cp or 1)))


def step_for(key: MaxKey, hw: HardwareSpec, train: TrainSpec) -> int:
    if key is MaxKey.SEQ_LEN:
        cp = train.parallel.cp or 1
        return max(SEQ_STEP_TOKENS, math.lcm(SEQ_STEP_TOKENS, cp))
    if key is MaxKey.GLOBAL_BATCH:
        return data_parallel_width(hw, train)
    return 1


def train_at(key: MaxKey, value: int, hw: HardwareSpec, train: TrainSpec) -> TrainSpec:
    """The TrainSpec planned for ``value`` of ``key`` (see the module docstring for what stays fixed)."""
    if key is MaxKey.SEQ_LEN:
        return dataclasses.replace(train, seq_len=value)
    w = data_parallel_width(hw, train)
    micro = value if key is MaxKey.MICRO_BATCH else value // w
    return dataclasses.replace(train, micro_batch_size=micro, global_batch_size=micro * w)


Planner = Callable[[ModelSpec, HardwareSpec, TrainSpec], Plan]


def find_max(model: ModelSpec, hw: HardwareSpec, train: TrainSpec, key: MaxKey, *,
             planner: Planner = plan) -> MaxResult:
    """The largest value of ``key`` that fits (module docstring). Raises NothingFitsError when the
    smallest value does not fit, PlanningError for a question with no answer."""
    if key is MaxKey.GLOBAL_BATCH and train.micro_batch_size is not None:
        raise PlanningError(f"--max global-batch with train.micro_batch {train.micro_batch_size}: with a fixed "
                            "micro batch the global batch only adds accumulation steps (no memory limit); "
                            "leave micro_batch auto, or ask --max micro-batch")
    step = step_for(key, hw, train)
    tried: dict[int, tuple[Plan | None, PlanningError | None]] = {}
    probed: dict[int, bool] = {}
    fitted_pairs: list[tuple] = []   # (method, optimizer, strategy, mesh) that fit at earlier probes

    def full(k: int) -> bool:
        if k not in tried:
            try:
                p = planner(model, hw, train_at(key, k * step, hw, train))
                tried[k] = (p, None) if p.chosen.fits else (p, NoFitError("; ".join(p.chosen.why_not), p))
            except PlanningError as e:
                tried[k] = (getattr(e, "plan", None), e)
        return tried[k][1] is None

    def attempt(k: int) -> bool:
        # the probes between the first value and the edge only ask "does it fit?": planner.first_fit walks
        # the same search as plan() up to its first fit (no step times, no Plan); a caller's own planner
        # (tests) is asked in full
        if planner is not plan:
            return full(k)
        if k not in probed:
            found = first_fit(model, hw, train_at(key, k * step, hw, train), prefer=tuple(fitted_pairs[-2:]))
            if found is not None and found not in fitted_pairs:
                fitted_pairs.append(found)
            probed[k] = found is not None
        return probed[k]

    if not full(1):
        err = tried[1][1]
        raise NothingFitsError(f"--max {key.value}: at {key.noun} {step:,}, the smallest value, nothing fits: {err}", key, step,
                               err)
    lo, hi = 1, None
    k = 1
    while hi is None:  # exponential growth
        k *= 2
        if k > MAX_STEPS:
            break
        if attempt(k):
            lo = k
        else:
            hi = k
    made = lambda: len(tried.keys() | probed.keys())  # noqa: E731  (values planned, probed or in full)
    if hi is None:
        if not full(lo):   # a probe disagreeing with plan(): see below
            return find_max(model, hw, train, key, planner=lambda m, h, t: plan(m, h, t))
        return _result(key, lo * step, step, tried[lo][0], None, None, made())
    while hi - lo > 1:  # bisection over multiples of step
        mid = (lo + hi) // 2
        if attempt(mid):
            lo = mid
        else:
            hi = mid
    if not (full(lo) and not full(hi)):
        # a probe disagreeing with plan() would be a bug (tests/test_plan_speed_equivalence.py): never answer
        # from it — search again planning every value in full
        return find_max(model, hw, train, key, planner=lambda m, h, t: plan(m, h, t))
    nxt_plan, nxt_err = tried[hi]
    return _result(key, lo * step, step, tried[lo][0], nxt_plan, nxt_err, made(), next_value=hi * step)


def _result(key: MaxKey, value: int, step: int, fit: Plan, nxt: Plan | None, err: PlanningError | None,
            made: int, next_value: int | None = None) -> MaxResult:
    usable = fit.gpu_memory_bytes - fit.headroom_bytes
    base = dict(key=key, value=value, step=step, plan=fit, next_value=next_value, usable_bytes=usable,
                plans_made=made)
    if next_value is None:
        return MaxResult(**base, limit=Limit.SEARCH_CAP, term=Limit.SEARCH_CAP.value, term_bytes=0,
                         next_needs_bytes=0)
    if nxt is None:  # the planner found no candidate at all: no mesh / batch split is legal there
        return MaxResult(**base, limit=Limit.NO_LEGAL_MESH, term=Limit.NO_LEGAL_MESH.value, term_bytes=0,
                         next_needs_bytes=0, detail=str(err))
    return MaxResult(**base, **limiting_term(nxt))


def limiting_term(least: Plan) -> dict:
    """What stops the least-memory plan at the next value: its largest per-GPU term when the GPU is short,
    else host RAM, else NVMe (in the planner's order of why_not)."""
    c, hw = least.chosen, least.hardware
    usable = least.gpu_memory_bytes - least.headroom_bytes
    detail = "; ".join(c.why_not)
    if c.gpu_need_bytes > usable:
        term = max(MEMORY_TERMS, key=lambda t: getattr(c.per_gpu, t))
        part = {}
        if term == "activations":   # name the part a long-context saver acts on
            parts = activation_parts(least.model, least.train, c)
            name = max(parts, key=parts.get)
            part = dict(part=name, part_bytes=parts[name])
        return dict(limit=Limit.GPU_TERM, term=term, term_bytes=getattr(c.per_gpu, term),
                    next_needs_bytes=c.gpu_need_bytes, detail=detail, **part)
    if c.cpu_memory_per_node_bytes > hw.cpu_memory_bytes:
        return dict(limit=Limit.HOST_RAM, term=Limit.HOST_RAM.value, term_bytes=c.cpu_memory_per_node_bytes,
                    next_needs_bytes=c.per_gpu.total, detail=detail)
    return dict(limit=Limit.NVME, term=Limit.NVME.value, term_bytes=c.nvme_bytes, next_needs_bytes=c.per_gpu.total,
                detail=detail)


def overrides_at(key: MaxKey, value: int, hw: HardwareSpec, train: TrainSpec) -> dict[str, str]:
    """The run-config overrides (``--set`` keys) that plan ``value`` of ``key`` as :func:`train_at` does,
    for re-planning through the config pipeline (its "to fit, try" suggestions)."""
    t = train_at(key, value, hw, train)
    if key is MaxKey.SEQ_LEN:
        return {"train.seq_len": str(t.seq_len)}
    return {"train.micro_batch": str(t.micro_batch_size), "train.global_batch": str(t.global_batch_size)}
