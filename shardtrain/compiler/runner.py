"""The runner's loss path and wrapping: what differs when the plan runs under the Hugging Face Trainer or
accelerate (what `emit --format trainer | accelerate` writes for) instead of shardtrain's runtime.

Our runtime computes the loss outside the model (shardtrain/runtime/loss.py: full fp32 cross-entropy, or
chunked) after the FSDP2 root's forward has returned. The HF runners call ``model(input_ids,
labels=...)``: the causal-LM loss runs INSIDE ``LlamaForCausalLM.forward``, i.e. inside the root FSDP
unit (accelerate's FSDP2 wraps every ``_no_split_modules`` decoder layer and then the root:
accelerate/utils/fsdp_utils.py fsdp2_prepare_model). So:

- the root's unsharded parameters (embedding, final norm, lm_head) are still gathered while the fp32
  loss runs in the forward (its post-forward reshard waits for the loss), and its pre-backward hook sits
  on the loss itself, so the root is re-gathered (all-gather output + copied-out parameters) BEFORE the
  fp32 loss backward, not after it as in our runtime (compiler/phases.py FSDP instants). Measured by
  the issue-19 session: HF's own step on Llama-3.2-1B, full checkpointing, FSDP2, peaks ~12% above our
  runtime's plan; tests/test_runner_path.py traces it on a tiny Llama.
- the chunked loss is Liger-Kernel's fused linear cross-entropy there (emit/trainer.py sets
  ``use_liger_kernel`` with ``fused_linear_cross_entropy`` for a chunked plan; transformers trainer.py
  apply_liger_kernel patches the model's forward, so the loss is still inside the root unit); its memory
  is taken as our chunked path's (not separately modelled). No op-level SAC: the Trainer checkpoints
  whole layers (``gradient_checkpointing_enable``).
- the transformers version changes the fp32 copies of the logits (per token and vocab entry, B·S·V):
  * < 4.46 (4.44.2 / 4.45.2 models/llama/modeling_llama.py LlamaForCausalLM.forward): ``logits =
    logits.float()`` in the model (the fp32 logits are the returned output), then ``shift_logits =
    logits[..., :-1, :].contiguous()``, a second fp32 copy; CrossEntropyLoss's log_softmax output is the
    third: forward 12 bytes (+2 over today's 10: the 16-bit logits die at the upcast), backward +4 (the
    slice's backward materialises the full fp32 gradient next to the shifted one).
  * 4.46 - 4.48 (loss/loss_utils.py ForCausalLMLoss): the upcast moved into the loss (the 16-bit logits
    stay in the model output), the ``shift_logits ... .contiguous()`` copy remains: forward 14 (+4),
    backward +4.
  * >= 4.49 (loss_utils.py: ``labels = nn.functional.pad(labels, (0, 1), value=ignore_index)``, the
    labels are shifted instead of the logits): 16-bit logits + fp32 upcast + log_softmax output, as our
    runtime's full path (+0).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from shardtrain.compiler.specs import Runner


@dataclass(frozen=True)
class RunnerPath:
    """What the phase model changes for a runner."""
    chunked_loss: bool
    """The runner has a chunked loss (ours, or Liger's fused linear cross-entropy under the Trainer)."""
    op_ckpt: bool
    """The runner has op-level selective checkpointing (only our runtime)."""
    loss_in_root: bool
    """The loss runs inside the root FSDP unit's forward (HF ``model(..., labels=...)``)."""
    extra_fwd_logits_bytes: int
    """fp32 bytes per logit beyond our full path at the forward's loss instant (per B·S·V)."""
    extra_bwd_logits_bytes: int
    """... and at the loss backward."""


def transformers_line(version: str | None) -> tuple[int, int]:
    """(major, minor) of a version string like "4.44.2"; None = the current line (treated as 5.0)."""
    if not version:
        return (5, 0)
    m = re.match(r"^\s*(\d+)\.(\d+)", str(version))
    if not m:
        raise ValueError(f"train.runner_transformers: {version!r} is not a version like 4.44.2; "
                         "give the transformers version the runner uses, or leave it unset (current)")
    return int(m.group(1)), int(m.group(2))


def runner_path(runner: Runner, transformers_version: str | None = None) -> RunnerPath:
    """The loss-path and wrapping terms of ``runner`` (see the module docstring for the sources)."""
    if runner is Runner.SHARDTRAIN:
        return RunnerPath(chunked_loss=True, op_ckpt=True, loss_in_root=False,
                          extra_fwd_logits_bytes=0, extra_bwd_logits_bytes=0)
    line = transformers_line(transformers_version)
    if line < (4, 46):
        fwd, bwd = 2, 4
    elif line < (4, 49):
        fwd, bwd = 4, 4
    else:
        fwd, bwd = 0, 0
    return RunnerPath(chunked_loss=True, op_ckpt=False, loss_in_root=True,
                      extra_fwd_logits_bytes=fwd, extra_bwd_logits_bytes=bwd)
