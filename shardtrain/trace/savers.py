"""The long-context savers of a plan in the traced step, through the runtime's own code (issue 20):

- the chunked loss: runtime/loss.py `TokenLoss` (decoder forward hook, `logits_to_keep` = no position,
  `ChunkedHeadLoss` chunk loop under non-reentrant checkpoint, FSDP2 root kept gathered) on `TraceEngine`,
  the slice of the engines' interface it reads (runtime/engines.py: model, forward, autocast, kind);
- the tiled MLP: runtime/modeling.py `tile_mlps` (after LoRA, build_model's call);
- checkpoint offload: runtime/ckpt_offload.py's stash (installed by modeling.enable_checkpointing). Its
  host copies are host memory on a GPU; on a fake CPU run everything is "cpu", so `host_resident` makes
  the tracker file the copies the stash allocates under a separate key (`trackers.HOST`, never in a
  device peak), and gives unpack a device copy (on CPU `.to("cpu")` returns the host tensor itself; on
  a GPU the recompute reads a fresh device copy). What moved is reported as the runtime's stash counts
  it (`ckpt_stash(model).bytes` per micro-step).
"""
from __future__ import annotations

from torch import nn

from shardtrain.compiler.specs import Engine, LossMode


class TraceEngine:
    """What runtime/loss.py TokenLoss reads of an engine: `model`, `forward(batch) -> logits` in the
    engine's compute context (DDP: autocast; FSDP2: its MixedPrecisionPolicy, no context), `autocast`,
    `device`, `kind`."""

    def __init__(self, model: nn.Module, kind: Engine, autocast_factory, device):
        self.model, self.kind, self.device = model, kind, device
        self._autocast = autocast_factory

    def autocast(self):
        return self._autocast()

    def forward(self, batch: dict):
        with self.autocast():
            return self.model(**batch).logits


def token_loss(plan, model: nn.Module, kind: Engine, autocast_factory, device):
    """The rank's loss of plan.chosen (full or chunked): runtime/loss.py TokenLoss.from_plan."""
    from shardtrain.runtime.loss import TokenLoss
    return TokenLoss.from_plan(TraceEngine(model, kind, autocast_factory, device), plan)


def install_tiled(plan, model: nn.Module) -> int:
    """plan.chosen.tiled_mlp_tiles on every decoder layer: runtime/modeling.py build_model's call, tile_mlps."""
    from shardtrain.runtime.modeling import tile_mlps
    return tile_mlps(model, plan.chosen.tiled_mlp_tiles, plan.model.decoder_layer_class, plan.chosen.strategy.engine)


def host_resident(stash, tracker) -> None:
    """Route the stash's host copies to the tracker's host key, and give unpack a device copy (module doc)."""
    pack, unpack = stash.pack, stash.unpack

    def traced_pack(t):
        with tracker.host_allocations():
            return pack(t)

    def traced_unpack(packed):
        out = unpack(packed)
        return out.clone() if packed[0] is not None and out is packed[1] else out

    stash.pack, stash.unpack = traced_pack, traced_unpack   # instance attributes: HostStash.hooks() reads them


def loss_label(plan) -> str:
    """How the traced loss ran, for the output line."""
    c = plan.chosen
    if c.loss is LossMode.CHUNKED:
        return f"chunked loss ({plan.train.loss_chunk_tokens} tokens a chunk)"
    return "full loss"
