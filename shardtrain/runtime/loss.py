"""The training loss of one micro-batch: summed next-token cross-entropy, full or chunked, with
optional activation offload to host memory.

full (HF ForCausalLMLoss, worker.ce_sum): the model returns the whole logits tensor b·s·V and the loss
upcasts it to fp32 — the `logits` term of compiler/activations.py.

chunked (torchtune CEWithChunkedOutputLoss, Liger-Kernel LigerFusedLinearCrossEntropyLoss): the model
runs with `logits_to_keep` = no position, so the wrapped forward (DDP / FSDP2 root / DeepSpeed engine,
which must run for gradient sync and parameter gathering) stops at the final norm, whose output is
captured by a forward hook on the decoder. Then the output projection + fp32 cross-entropy run chunk
by chunk under torch.utils.checkpoint(use_reentrant=False): at most one chunk's logits exist, in
forward and in backward (the chunk is recomputed there). The projection is always *called as the
module* (`lm_head(x)`): FSDP2 (its own fully_shard unit or the root's unsharded parameters), DeepSpeed
ZeRO-3 (gathers on the module's forward hooks, again during the recomputation), peft (a LoRA-adapted
lm_head), tied embeddings and autocast (the engine's context) then behave as in the full path.
FSDP2's root unit would reshard after forward when reshard_after_forward=True is passed explicitly
(torch's own default for the root is not to: _fsdp_state.py `_lazy_init`, "the parameters would be
freed and all-gathered immediately"); the chunks run between forward and backward, so the root keeps
its parameters gathered, as torch does by default.

activation offload: tensors saved for backward during the model forward go to host memory
(torch.autograd.graph.save_on_cpu's pack/unpack, pinned on CUDA only) and come back for backward;
non-reentrant checkpointing saves its inputs through the same hooks (_CheckpointFrame.save_inputs), so
with checkpointing only the checkpointed layers' inputs move. Parameters are not copied (they stay
resident anyway; torchtune's OffloadActivations skips them too).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from shardtrain.compiler.specs import ActivationOffload, Engine, LossMode

IGNORE_INDEX = -100


def ce_sum(logits: torch.Tensor, labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled tokens (fp32, like HF's loss). `shifted`: labels were
    already shifted left over the FULL sequence before a context-parallel slice (context_parallel.cp_slice:
    position t's label is token t+1, the last one -100), so every position is scored, none dropped."""
    if shifted:
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum")
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm(model: nn.Module) -> nn.Module:
    """The HF *ForCausalLM under DDP / DeepSpeed / peft wrappers (FSDP2 wraps in place)."""
    m = model
    for _ in range(4):
        if hasattr(m, "get_base_model"):        # peft PeftModel
            m = m.get_base_model()
        elif hasattr(m, "get_output_embeddings"):
            return m
        elif hasattr(m, "module"):              # DDP, DeepSpeedEngine
            m = m.module
    if not hasattr(m, "get_output_embeddings"):
        raise TypeError(f"{type(model).__name__}: no causal LM with get_output_embeddings() inside")
    return m


def _chunk_ce(lm_head: nn.Module, autocast, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with autocast():
        logits = lm_head(h)
    return nn.functional.cross_entropy(logits.float(), y, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_ce_sum(hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, chunk_tokens: int,
                   autocast=contextlib.nullcontext, check_recompute: bool = True,
                   shifted: bool = False) -> torch.Tensor:
    """ce_sum(lm_head(hidden), labels) without ever holding more than `chunk_tokens` rows of logits.
    Position t predicts labels[t + 1]; the last position gets the ignore index (HF shifts the same way).
    Every rank runs the same number of chunks (ZeRO-3 gathers are collectives).

    check_recompute=False (DeepSpeed ZeRO-3 with a frozen lm_head: LoRA, QLoRA): checkpoint keeps a live,
    undetached reference to a frozen weight, and ZeRO-3's post-forward hook partitions it in place
    during the recompute, so the metadata check sees shape [0] (deepspeedai/DeepSpeed#8148,
    huggingface/transformers#47254; 0.19.8 lacks the fix). The values are still right: ZeRO-3's
    pre-backward hook re-gathers the weight before lm_head's backward reads it."""
    target = (labels if shifted else nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)).reshape(-1)
    h = hidden.reshape(-1, hidden.size(-1))
    fn = functools.partial(_chunk_ce, lm_head, autocast)
    total = None
    for hc, yc in zip(h.split(chunk_tokens), target.split(chunk_tokens)):
        if torch.is_grad_enabled():
            part = checkpoint(fn, hc, yc, use_reentrant=False,
                              determinism_check="default" if check_recompute else "none")
        else:
            part = fn(hc, yc)
        total = part if total is None else total + part
    return total


class ChunkedHeadLoss(nn.Module):
    """chunked_ce_sum as a module call, so hook-based tools see lm_head's repeated calls nested in one
    parent (torch's MemTracker refuses a second top-level call of a module per tracking session).
    lm_head is held without registering it: it stays a submodule of the model only."""

    def __init__(self, lm_head: nn.Module, chunk_tokens: int, autocast, check_recompute: bool):
        super().__init__()
        self._head = (lm_head,)
        self.chunk_tokens, self.autocast, self.check_recompute = chunk_tokens, autocast, check_recompute

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
        return chunked_ce_sum(hidden, labels, self._head[0], self.chunk_tokens, self.autocast,
                              check_recompute=self.check_recompute, shifted=shifted)


@contextlib.contextmanager
def offload_activations(device: torch.device, stats: dict | None = None):
    """Everything the forward saves for backward in host memory: runtime/ckpt_offload.py `HostStash`'s
    hooks (torch.autograd.graph.save_on_cpu's, minus parameters; see module docstring) over the whole
    forward. `stats` (optional) counts what moved: {"tensors": n, "bytes": b}, added up over calls."""
    from shardtrain.runtime.ckpt_offload import HostStash
    stash = HostStash(pin_memory=device.type == "cuda")
    try:
        with stash.hooks():
            yield
    finally:
        if stats is not None:
            stats["tensors"] = stats.get("tensors", 0) + stash.tensors
            stats["bytes"] = stats.get("bytes", 0) + stash.bytes


class TokenLoss:
    """`loss(batch, labels)` -> summed CE of the micro-batch through the engine, per the plan."""

    def __init__(self, engine, mode: LossMode = LossMode.FULL, chunk_tokens: int = 512,
                 activation_offload: ActivationOffload = ActivationOffload.NONE):
        if mode is LossMode.AUTO:
            raise ValueError("train.loss: auto must be resolved by the planner (plan.json 'loss')")
        self.engine, self.mode, self.chunk_tokens = engine, mode, int(chunk_tokens)
        self.offload = activation_offload
        self.offload_stats: dict = {}
        if mode is LossMode.CHUNKED:
            lm = causal_lm(engine.model)
            self.decoder = getattr(lm, lm.base_model_prefix)
            # logits for no position; a tp-split lm_head (runtime/tensor_parallel.py) gets one: DTensor's
            # view rule cannot shard an empty slice ("integer modulo by zero"); the logits are unused
            self.keep = 1 if getattr(lm.get_output_embeddings(), "_shardtrain_tp_split", False) else 0
            self.head_loss = ChunkedHeadLoss(lm.get_output_embeddings(), self.chunk_tokens,
                                             getattr(engine, "autocast", contextlib.nullcontext),
                                             check_recompute=getattr(engine, "zero_stage", 0) != 3)
            if getattr(engine, "kind", None) is Engine.FSDP and hasattr(engine.model, "set_reshard_after_forward"):
                # keep the root's params (lm_head, tied embeddings) gathered until backward, as torch's
                # default for the root does; lm_head in its own unit would gather on its own call
                engine.model.set_reshard_after_forward(False, recurse=False)

    @classmethod
    def from_plan(cls, engine, plan) -> "TokenLoss":
        c = plan.chosen
        return cls(engine, c.loss, plan.train.loss_chunk_tokens, c.activation_offload)

    def _offload_ctx(self):
        if self.offload is ActivationOffload.CPU and torch.is_grad_enabled():
            return offload_activations(self.engine.device, self.offload_stats)
        return contextlib.nullcontext()

    def __call__(self, batch: dict, labels: torch.Tensor, shifted: bool = False) -> torch.Tensor:
        """`shifted`: labels come pre-shifted from a context-parallel slice (see ce_sum)."""
        eng = self.engine
        if self.mode is LossMode.FULL:
            with self._offload_ctx():
                logits = eng.forward(batch)
            return ce_sum(logits, labels, shifted)
        box = {}

        def grab(_m, _a, out):
            box["h"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        handle = self.decoder.register_forward_hook(grab)
        try:
            keep = self.keep or torch.zeros(0, dtype=torch.long, device=labels.device)  # logits for no position
            with self._offload_ctx():
                eng.forward({**batch, "logits_to_keep": keep})
        finally:
            handle.remove()
        return self.head_loss(box.pop("h"), labels, shifted)


def token_loss(r) -> TokenLoss:
    """The run's loss (built once per Run from plan.json, kept in `Run.extra`)."""
    if "loss" not in r.extra:
        r.extra["loss"] = TokenLoss.from_plan(r.engine, r.plan)
    return r.extra["loss"]
