"""Optimizer-state bytes per tensor, for each optimizer, as the real implementations allocate them.

Sources:
- AdamW (torch.optim.AdamW): exp_avg + exp_avg_sq in fp32 = 8 B/param (ZeRO paper: K=12 incl. master).
- bitsandbytes 8-bit AdamW (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"):
  two uint8 states = 2 B/param plus one fp32 absmax per block of 256 elements (per state) =
  2·4/256 B/param; tensors with fewer than `min_8bit_size` = 4096 elements keep fp32 states
  (8 B/param). bitsandbytes 0.50.2 optim/optimizer.py Optimizer2State.init_state: `blocksize = 256`,
  `absmax1 = torch.zeros((blocks,), float32)` — the paper's 2048 is no longer what is allocated — and
  `state["qmap1"] = self.name2qmap["dynamic"]`, `state["qmap2"] = self.name2qmap["udynamic"]`: two
  256-entry fp32 quantization maps shared by every tensor of the optimizer (2 KiB once).
  Checked against a real AdamW8bit in tests/test_memory_model.py and tests/test_truth_engines.py.
- Adafactor (Shazeer & Stern 2018; transformers.optimization.Adafactor, beta1=None): matrices keep a
  factored second moment, rows + cols fp32 over the last two dims; vectors keep a full fp32 moment.
- Lion (Chen et al. 2023): one momentum, fp32 = 4 B/param.
- SGD with momentum: one momentum buffer, fp32 = 4 B/param.
Under DeepSpeed ZeRO the optimizer sees flat 1-D partitions (stage_1_and_2.py / stage3.py flatten
each param group), so Adafactor cannot factor (4 B/param) and the 8-bit size threshold applies to
the whole partition.
On a tensor-parallel mesh the callers pass the tp-local shapes (compiler/mesh_memory.tp_local_groups):
a rowwise weight arrives as (out, in / tp), a colwise one as (out / tp, in), and `shard` then splits
dim 0 of that local tensor — what FSDP2 does to a DTensor's local shard on the dp_shard × cp mesh.
"""
from __future__ import annotations

import math

from shardtrain.compiler.inventory import TensorGroup
from shardtrain.compiler.specs import Optimizer

BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes Optimizer8bit default `min_8bit_size`: smaller tensors keep 32-bit state."""
BNB_BLOCK_SIZE = 256
"""bitsandbytes block-wise quantization block size for 8-bit optimizer states (0.50.2
Optimizer2State/Optimizer1State.init_state: `blocksize = 256`, the same on CPU and CUDA)."""
BNB_QMAP_BYTES = 256 * 4
"""One bitsandbytes quantization map (256 fp32 values); 2-state optimizers hold two (dynamic,
udynamic), shared by all tensors of one optimizer."""


def _adafactor_bytes(shape: tuple[int, ...]) -> int:
    if len(shape) >= 2:
        lead = math.prod(shape[:-2])
        return 4 * lead * (shape[-2] + shape[-1])
    return 4 * math.prod(shape)


def _bnb8_bytes(numel: int, num_states: int) -> int:
    if numel < BNB_MIN_8BIT_SIZE:
        return 4 * num_states * numel
    blocks = math.ceil(numel / BNB_BLOCK_SIZE)
    return num_states * (numel + 4 * blocks)


def state_bytes_per_tensor(opt: Optimizer, shape: tuple[int, ...], elem_bytes: int = 4) -> int:
    """State bytes one unsharded tensor of `shape` costs (DDP, or FSDP before sharding). `elem_bytes`: the
    dtype of a state element — torch AdamW/SGD (zeros_like / clone of the grad) and our Lion/Adafactor
    (runtime/optim.py: zeros_like, new_zeros) allocate states in the parameter's dtype, so 2 under pure
    bf16; bitsandbytes' 8-bit states are uint8 + fp32 absmax whatever the parameter dtype."""
    numel = math.prod(shape)
    if opt is Optimizer.ADAMW:
        return 2 * elem_bytes * numel
    if opt is Optimizer.ADAMW8BIT:
        return _bnb8_bytes(numel, 2)
    if opt is Optimizer.ADAFACTOR:
        return _adafactor_bytes(shape) * elem_bytes // 4
    if opt in (Optimizer.LION, Optimizer.SGD):
        return elem_bytes * numel
    raise ValueError(f"optimizer: unknown {opt!r}")


def state_bytes(opt: Optimizer, groups: tuple[TensorGroup, ...], *, shard: int = 1,
                flat_partitions: bool = False, elem_bytes: int = 4) -> int:
    """Optimizer-state bytes per rank for the trainable tensors.

    shard: number of ranks the states are split over (ZeRO N, FSDP shard group size).
    flat_partitions: DeepSpeed ZeRO flattens all trainable params into one 1-D partition per rank.
    FSDP2 shards each parameter along dim 0 (per-parameter DTensor), so factoring survives.
    elem_bytes: bytes of one state element (state_bytes_per_tensor; 2 under pure bf16).
    """
    trainable = [g for g in groups if g.trainable]
    if flat_partitions:
        n = math.ceil(sum(g.total for g in trainable) / shard)
        return state_bytes_per_tensor(opt, (n,), elem_bytes) + _qmap_bytes(opt, [n])
    total = 0
    numels = []
    for g in trainable:
        shape = g.shape
        if shard > 1:
            shape = (math.ceil(shape[0] / shard),) + shape[1:]
        total += state_bytes_per_tensor(opt, shape, elem_bytes) * g.count
        numels.append(math.prod(shape))
    return total + _qmap_bytes(opt, numels)


def _qmap_bytes(opt: Optimizer, numels: list[int]) -> int:
    """bitsandbytes' shared quantization maps, present once any tensor has 8-bit state."""
    if opt is Optimizer.ADAMW8BIT and any(n >= BNB_MIN_8BIT_SIZE for n in numels):
        return 2 * BNB_QMAP_BYTES
    return 0
