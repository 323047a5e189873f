"""PhaseInputs: everything the phase model (compiler/phases.py) and the gathered-parameter model
(compiler/gathered.py) need about one candidate — its own module so neither imports the other."""
from __future__ import annotations

from dataclasses import dataclass

from shardtrain.compiler.inventory import TensorGroup
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.specs import Method, Optimizer, ParallelDims, Precision, Strategy


@dataclass(frozen=True)
class PhaseInputs:
    """Everything the phase model needs about one candidate."""
    model: ModelSpec
    groups: tuple[TensorGroup, ...]
    strategy: Strategy
    shard_size: int
    method: Method
    precision: Precision
    optimizer: Optimizer
    micro_batch: int
    seq_len: int
    grad_ckpt_layers: int
    """Number of decoder layers whose activations are recomputed (0 .. num_layers)."""
    grad_accum: int
    defer_grad_sync: bool
    layer_act_bytes_per_token: float
    """activations.layer_bytes_per_token for the all-16-bit block."""
    logits_forward_bytes: int
    logits_backward_bytes: int
    activation_offload: bool = False
    """save_on_cpu: saved activations (and checkpointed layers' inputs) live in host RAM."""
    parallel: ParallelDims | None = None
    """The device mesh (None: tp 1, cp 1). `groups` are then the tensors one tp rank holds
    (mesh_memory.tp_local_groups) and `shard_size` the dp_shard × cp ranks they are sharded over."""
    op_saved_bytes_per_token: float = 0
    """grad_ckpt op: what each checkpointed layer keeps per token beyond its input (op_ckpt.py)."""
    head_tokens: int | None = None
    """Tokens whose logits the lm_head produces at once: None = all of them (the full loss); the chunked
    loss one chunk (runtime/loss.py chunked_ce_sum never holds more)."""
    loss_in_root: bool = False
    """The HF runners (compiler/runner.py): the loss runs inside the root FSDP unit's forward."""
    tiled_mlp_tiles: int = 1
    """Tiled MLP (compiler/savers.py): layer_act_bytes_per_token already excludes the MLP intermediates;
    the backward adds one tile's working set."""
    ckpt_offload: bool = False
    """Checkpointed layers' inputs in host RAM (compiler/savers.py); the device keeps one and a prefetched one."""

    @property
    def tp(self) -> int:
        return self.parallel.tp if self.parallel is not None else 1
