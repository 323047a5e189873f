"""The compiler's output: a frozen Plan with to_json()/from_json() (the stable `plan --json` object).

Key names follow shared/notes/architecture.md ("Stable interfaces"); extra keys carry what emitters
and the runtime need (ZeRO stage, offload devices, buckets, LoRA settings, the full model spec).
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass

from shardtrain.compiler.activations import logits_bytes
from shardtrain.compiler.facts import (FsdpSettings, ModelRef, RuntimeFacts, StateBytes,  # noqa: F401  (re-exported)
                                      utilisation)
from shardtrain.compiler.memory import ZeroBuckets
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.specs import Runner
from shardtrain.compiler.specs import (ActivationOffload, Attention, CkptOffload, GradCkpt, HardwareSpec, LoraSpec, LossMode,
                                       Method, Optimizer, ParallelDims, ParallelRequest, Precision, Strategy,
                                       TrainSpec)

MEMORY_TERMS = ("params", "grads", "master_params", "optimizer_states", "activations", "logits",
                "buffers", "cuda_context")


@dataclass(frozen=True)
class MemoryBreakdown:
    """Predicted peak bytes per GPU, term by term."""
    params: int
    grads: int
    master_params: int
    optimizer_states: int
    activations: int
    logits: int
    buffers: int
    cuda_context: int

    @functools.cached_property
    def total(self) -> int:
        # cached: the planner compares totals of thousands of candidates several times each
        return sum(getattr(self, k) for k in MEMORY_TERMS)

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.master_params + self.optimizer_states

    def to_json(self) -> dict:
        d = {k: int(getattr(self, k)) for k in MEMORY_TERMS}
        d["total"] = self.total
        return d

    @staticmethod
    def from_json(d: dict) -> "MemoryBreakdown":
        return MemoryBreakdown(**{k: int(d[k]) for k in MEMORY_TERMS})


@dataclass(frozen=True)
class Candidate:
    """One evaluated configuration (the chosen plan or an alternative)."""
    strategy: Strategy
    fits: bool
    micro_batch_size: int
    grad_accum_steps: int
    gradient_checkpointing: GradCkpt
    optimizer: Optimizer
    method: Method
    precision: Precision
    world_size: int
    per_gpu: MemoryBreakdown
    cpu_memory_per_node_bytes: int
    nvme_bytes: int
    step_time_s: float
    trainable_params: int
    fsdp_defer_grad_sync: bool = False
    """FSDP2: skip gradient reduce-scatter on non-final micro-steps (costs unsharded fp32 grads)."""
    why_not: tuple[str, ...] = ()
    """Why this candidate does not fit (empty when it fits)."""
    loss: LossMode = LossMode.FULL
    """The logits path this candidate assumes (auto resolved to full or chunked)."""
    activation_offload: ActivationOffload = ActivationOffload.NONE
    """cpu: saved activations in host RAM (torch.autograd.graph.save_on_cpu)."""
    per_phase: tuple[tuple[str, MemoryBreakdown], ...] = ()
    """(phase, breakdown) for "forward", "backward", "optimizer" (compiler/phases.py); per_gpu is the
    breakdown of peak_phase."""
    peak_phase: str = ""
    parallel: ParallelDims | None = None
    """The device mesh (dp_replicate × dp_shard × cp × tp = world_size). None only in plans written
    before the mesh existed: read them through ``mesh``."""
    tiled_mlp_tiles: int = 1
    """Sequence tiles of each checkpointed layer's MLP (1 = untiled; the resolved train.tiled_mlp)."""
    ckpt_offload: bool = False
    """The checkpointed layer inputs live in host memory between forward and backward (the resolved
    train.ckpt_offload; False under activation_offload cpu, which already moves them)."""
    peak_reserved_bytes: int = 0
    """Predicted torch.cuda.max_memory_reserved per GPU (compiler/allocator.py); 0 in plans written before
    the allocator model: read it through ``reserved_bytes``."""

    @property
    def allocated_bytes(self) -> int:
        """Predicted torch.cuda.max_memory_allocated: the peak breakdown without the CUDA context."""
        return self.per_gpu.total - self.per_gpu.cuda_context

    @property
    def reserved_bytes(self) -> int:
        """Predicted max_memory_reserved (old plans without it: the allocated peak)."""
        return self.peak_reserved_bytes or self.allocated_bytes

    @property
    def gpu_need_bytes(self) -> int:
        """The figure the fit rule compares with the GPU memory (and nvidia-smi's, predicted): reserved +
        everything outside the caching allocator (CUDA context, library workspaces, NCCL buffers)."""
        return self.reserved_bytes + self.per_gpu.cuda_context

    @property
    def mesh(self) -> ParallelDims:
        """The mesh, with the 1-D meaning of the strategy for plans that carry none."""
        if self.parallel is not None:
            return self.parallel
        return ParallelDims.for_strategy(self.strategy, self.world_size, self.world_size)

    @property
    def key(self) -> tuple:
        return (self.strategy, self.mesh, self.micro_batch_size, self.gradient_checkpointing, self.optimizer,
                self.method)


class ChangeKind(str, enum.Enum):
    """What a suggested change costs, cheapest first (the order advice is printed in)."""
    SAVER = "saver"
    """Same training math, other memory/time trade-off: chunked loss, activation offload, checkpointing,
    micro batch, strategy."""
    HARDWARE = "hardware"
    """Other hardware: bigger GPUs, more GPUs/nodes, more host RAM, an NVMe directory."""
    JOB = "job"
    """Other training math: method (LoRA/QLoRA), optimizer, shorter sequences."""

    @property
    def rank(self) -> int:
        return list(ChangeKind).index(self)


@dataclass(frozen=True)
class Suggestion:
    """One "to fit, try" change, applied to the run config and re-planned (compiler/advice.py): it fits."""
    set: tuple[tuple[str, str], ...]
    """(run-config key, value) pairs exactly as `--set KEY=VALUE` takes them, e.g. ("train.loss", "chunked")."""
    total_bytes: int
    """Per-GPU peak of the re-planned plan."""
    step_time_s: float
    """Estimated optimizer-step time of the re-planned plan."""
    strategy: Strategy
    """The strategy the re-planned plan chose."""
    kind: ChangeKind
    """The most expensive kind of change in ``set``."""

    def to_json(self) -> dict:
        return {"set": dict(self.set), "total_bytes": int(self.total_bytes),
                "step_time_s": round(self.step_time_s, 6), "strategy": self.strategy.value, "kind": self.kind.value}

    @staticmethod
    def from_json(d: dict) -> "Suggestion":
        return Suggestion(set=tuple((str(k), str(v)) for k, v in d["set"].items()),
                          total_bytes=int(d["total_bytes"]), step_time_s=float(d["step_time_s"]),
                          strategy=Strategy(d["strategy"]), kind=ChangeKind(d["kind"]))


@dataclass(frozen=True)
class Plan:
    chosen: Candidate
    alternatives: tuple[Candidate, ...]
    model: ModelSpec
    hardware: HardwareSpec
    train: TrainSpec
    gpu_memory_bytes: int
    headroom_bytes: int
    reasons: tuple[str, ...]
    lora_targets: tuple[str, ...] = ()
    runtime: RuntimeFacts | None = None
    """What the ranks need beyond the decisions (compiler/facts.py); set when a run dir is written
    (emit/runtime.py), never by the planner: `plan --json` does not show it."""
    suggestions: tuple[Suggestion, ...] = ()
    """When nothing fits: the changes that do fit, each verified by re-planning, cheapest first
    (compiler/advice.py, run by config/pipeline.py)."""
    assumed: tuple[tuple[str, int], ...] = ()
    """(run-config key, value the planner used) for limits the user did not give, e.g.
    ("hardware.cpu_memory", 1 TiB): the verdict may change with the real figure."""

    @property
    def strategy(self) -> Strategy:
        return self.chosen.strategy

    @property
    def parallel(self) -> ParallelDims:
        """The chosen device mesh (old plans: the strategy's 1-D mesh on this hardware)."""
        c = self.chosen
        return c.parallel or ParallelDims.for_strategy(c.strategy, c.world_size, self.hardware.gpus_per_node)

    @property
    def zero_buckets(self) -> ZeroBuckets:
        # the buckets memory.model_state_bytes assumed for this plan
        return ZeroBuckets.for_model(self.model, self.chosen.trainable_params, offload=self.strategy.offloads)

    # ------------------------------------------------------------------ JSON
    def _candidate_json(self, c: Candidate, best_time: float) -> dict:
        return {
            "strategy": c.strategy.value, "fits": c.fits,
            "gpu_memory_bytes": self.gpu_memory_bytes, "headroom_bytes": self.headroom_bytes,
            "micro_batch_size": c.micro_batch_size, "grad_accum_steps": c.grad_accum_steps,
            "gradient_checkpointing": c.gradient_checkpointing.value, "optimizer": c.optimizer.value,
            "method": c.method.value, "precision": c.precision.value, "world_size": c.world_size,
            "model": {"num_params": self.model.num_params, "trainable_params": c.trainable_params,
                      "num_layers": self.model.num_layers},
            "per_gpu": c.per_gpu.to_json(),
            # what each reporting tool would show (compiler/allocator.py): max_memory_allocated,
            # max_memory_reserved, nvidia-smi (= the fit figure)
            "peak_allocated_bytes": c.allocated_bytes, "peak_reserved_bytes": c.reserved_bytes,
            "nvidia_smi_bytes": c.gpu_need_bytes,
            "cpu_memory_per_node_bytes": int(c.cpu_memory_per_node_bytes), "nvme_bytes": int(c.nvme_bytes),
            "relative_step_time": round(c.step_time_s / best_time, 4) if best_time > 0 else 1.0,
            "estimated_step_time_s": round(c.step_time_s, 6),
            "zero_stage": c.strategy.zero_stage, "engine": c.strategy.engine.value,
            "offload_optimizer": c.strategy.offload_optimizer.value,
            "offload_params": c.strategy.offload_params.value,
            "fsdp_defer_grad_sync": c.fsdp_defer_grad_sync,
            "loss": c.loss.value, "loss_chunk_tokens": self.train.loss_chunk_tokens,
            # the logits path's own peak for this loss mode (per_gpu shows it only when it is the peak)
            "logits_path_bytes": logits_bytes(self.model, micro_batch=c.micro_batch_size, seq_len=self.train.seq_len,
                                              precision=c.precision, loss=c.loss,
                                              chunk_tokens=self.train.loss_chunk_tokens, parallel=c.parallel),
            "activation_offload": c.activation_offload.value,
            "tiled_mlp_tiles": c.tiled_mlp_tiles, "ckpt_offload": c.ckpt_offload,
            "parallel": (c.parallel or ParallelDims.for_strategy(c.strategy, c.world_size,
                                                                 self.hardware.gpus_per_node)).to_json(),
            "why_not": list(c.why_not),
            **({"per_phase": {ph: b.to_json() for ph, b in c.per_phase}, "peak_phase": c.peak_phase}
               if c.per_phase else {}),
        }

    def to_json(self) -> dict:
        best = self.chosen.step_time_s
        d = self._candidate_json(self.chosen, best)
        d["reasons"] = list(self.reasons)
        d["alternatives"] = [self._candidate_json(c, best) for c in self.alternatives]
        t = self.train
        d["global_batch_size"] = t.global_batch_size
        d["seq_len"] = t.seq_len
        d["attention"] = t.attention.value
        d["selective_every"] = t.selective_every
        d["lora"] = ({"rank": t.lora.rank, "alpha": t.lora.alpha, "dropout": t.lora.dropout,
                      "targets": list(self.lora_targets)} if self.chosen.method is not Method.FULL else None)
        d["zero_buckets"] = dataclasses.asdict(self.zero_buckets)
        d["spec"] = {"model": self.model.to_dict(), "hardware": dataclasses.asdict(self.hardware),
                     "train": _train_json(t)}
        d["suggestions"] = [x.to_json() for x in self.suggestions]
        d["assumed"] = {k: int(v) for k, v in self.assumed}
        if self.runtime is not None:
            d["runtime"] = self.runtime.to_json()
        return d

    @staticmethod
    def from_json(d: dict) -> "Plan":
        spec = d["spec"]
        model = ModelSpec.from_dict(spec["model"])
        hw = HardwareSpec(**spec["hardware"])
        train = _train_from_json(spec["train"])

        def cand(c: dict) -> Candidate:
            return Candidate(
                strategy=Strategy(c["strategy"]), fits=c["fits"], micro_batch_size=c["micro_batch_size"],
                grad_accum_steps=c["grad_accum_steps"], gradient_checkpointing=GradCkpt(c["gradient_checkpointing"]),
                optimizer=Optimizer(c["optimizer"]), method=Method(c["method"]), precision=Precision(c["precision"]),
                world_size=c["world_size"], per_gpu=MemoryBreakdown.from_json(c["per_gpu"]),
                cpu_memory_per_node_bytes=c["cpu_memory_per_node_bytes"], nvme_bytes=c["nvme_bytes"],
                step_time_s=c["estimated_step_time_s"], trainable_params=c["model"]["trainable_params"],
                fsdp_defer_grad_sync=c.get("fsdp_defer_grad_sync", False), why_not=tuple(c.get("why_not", ())),
                loss=LossMode(c.get("loss", "full")),
                activation_offload=ActivationOffload(c.get("activation_offload", "none")),
                per_phase=tuple((ph, MemoryBreakdown.from_json(b)) for ph, b in (c.get("per_phase") or {}).items()),
                peak_phase=c.get("peak_phase", ""),
                tiled_mlp_tiles=int(c.get("tiled_mlp_tiles", 1)), ckpt_offload=bool(c.get("ckpt_offload", False)),
                peak_reserved_bytes=int(c.get("peak_reserved_bytes", 0)),
                parallel=(ParallelDims.from_json(c["parallel"]) if c.get("parallel")
                          else ParallelDims.for_strategy(Strategy(c["strategy"]), c["world_size"],
                                                         hw.gpus_per_node)))
        lora = d.get("lora") or {}
        return Plan(chosen=cand(d), alternatives=tuple(cand(a) for a in d.get("alternatives", [])),
                    model=model, hardware=hw, train=train, gpu_memory_bytes=d["gpu_memory_bytes"],
                    headroom_bytes=d["headroom_bytes"], reasons=tuple(d.get("reasons", ())),
                    lora_targets=tuple(lora.get("targets", ())),
                    runtime=RuntimeFacts.from_json(d["runtime"]) if d.get("runtime") else None,
                    suggestions=tuple(Suggestion.from_json(x) for x in d.get("suggestions") or ()),
                    assumed=tuple((str(k), int(v)) for k, v in (d.get("assumed") or {}).items()))


def _train_json(t: TrainSpec) -> dict:
    d = dataclasses.asdict(t)
    for k, v in list(d.items()):
        if hasattr(v, "value"):
            d[k] = v.value
    d["lora"] = {**dataclasses.asdict(t.lora), "targets": list(t.lora.targets)}
    d["strategy"] = t.strategy.value if t.strategy else None
    d["parallel"] = t.parallel.to_json()
    return d


def _train_from_json(d: dict) -> TrainSpec:
    d = dict(d)
    lora = d.pop("lora")
    return TrainSpec(
        **{**d, "precision": Precision(d["precision"]), "method": Method(d["method"]),
           "optimizer": Optimizer(d["optimizer"]), "grad_ckpt": GradCkpt(d["grad_ckpt"]),
           "attention": Attention(d["attention"]),
           "loss": LossMode(d.get("loss", "full")),
           "activation_offload": ActivationOffload(d.get("activation_offload", "none")),
           "ckpt_offload": CkptOffload(d.get("ckpt_offload", "auto")),
           "strategy": Strategy(d["strategy"]) if d.get("strategy") else None,
           "parallel": ParallelRequest.from_json(d.get("parallel")),
           "runner": Runner(d.get("runner", "shardtrain"))},
        lora=LoraSpec(**{**lora, "targets": tuple(lora["targets"])}))
