"""Per-step scalars of the training loop without extra collectives or host syncs (issue 11).

- Token counts: the sampler is a pure function of (step, micro, dp rank) and every rank holds the whole
  tokenized dataset, so each rank counts the GLOBAL label and input tokens of a step from the sample
  indices of all ranks (per-sample counts cached), with no all-reduce before the backward. The
  count is the same integer the old all-reduce produced, so the loss scale — and the gradient — are
  bit-identical (tests/runtime/test_equivalence.py). On a device mesh the sampler's ranks are the dp
  ranks (tp and cp peers share a sequence), so each sequence is counted once, not tp × cp times.
- The loss is accumulated as a device tensor (no `float(loss)` sync per micro-step) and summed over
  ranks in the step's single collective (`dist.reduce_sum`), read back once.
- Throughput: tokens/s per device, achieved TFLOP/s and MFU/HFU from the plan's runtime facts (FLOPs per
  token from compiler/flops.py, the GPU preset's peak; emit/runtime.py puts them in plan.json).
"""
from __future__ import annotations

from shardtrain.compiler.plan import utilisation
from shardtrain.runtime.data import IGNORE


class GlobalTokens:
    """(label tokens, input tokens) of one optimizer step over all ranks, from the dataset."""

    def __init__(self, ds, sampler):
        self.ds, self.sampler = ds, sampler
        self._counts: dict[int, tuple[int, int]] = {}

    @staticmethod
    def supported(ds, sampler) -> bool:
        return hasattr(ds, "samples") and hasattr(sampler, "micro_indices")

    def _sample(self, i: int) -> tuple[int, int]:
        c = self._counts.get(i)
        if c is None:
            ids, labels = self.ds.samples[i]
            # = data.count_label_tokens on the collated row: labels[1:] that are not IGNORE (padding is
            # IGNORE); inputs = the row's attention-mask sum (= its length; unpadded rows fill the batch)
            c = self._counts[i] = (sum(1 for t in labels[1:] if t != IGNORE), len(ids))
        return c

    def step(self, step: int) -> tuple[int, int]:
        s = self.sampler
        n_label = n_input = 0
        for k in range(s.k):
            for r in range(s.w):
                for i in s.micro_indices(step, k, r):
                    a, b = self._sample(i)
                    n_label += a
                    n_input += b
        return n_label, n_input


class Throughput:
    """tokens/s per device, and TFLOP/s + MFU (model FLOPs) + HFU (with recomputation) per device."""

    def __init__(self, plan, world_size: int, device_type: str, checkpointed_layers: int):
        rt = plan.runtime
        self.model_flops = rt.model_flops_per_token
        self.hardware_flops = rt.hardware_flops_per_token(checkpointed_layers)
        self.world = max(1, world_size)
        self.peak_tflops = rt.peak_tflops if device_type == "cuda" else 0.0

    def metrics(self, tokens: float, seconds: float) -> dict:
        per_dev = tokens / max(seconds, 1e-12) / self.world
        out = {"tokens_per_s_per_device": per_dev,
               "tflops_per_device": self.hardware_flops * per_dev / 1e12}
        if self.peak_tflops > 0:
            # achieved FLOP/s over the peak (PaLM's MFU; HFU counts the recomputed forward too)
            out["mfu"] = utilisation(self.model_flops, per_dev, self.peak_tflops)
            out["hfu"] = utilisation(self.hardware_flops, per_dev, self.peak_tflops)
        return out
