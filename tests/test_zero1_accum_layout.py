"""Issue 19: the ZeRO-1 + accumulation layout terms (compiler/zero_layout.py), by hand on a small flat
buffer; the real engine is checked in tests/runtime/test_zero1_accum_world4.py."""
from __future__ import annotations

from shardtrain.compiler.zero_layout import _zero1_flush_own, zero12_partitions


def test_flush_own_counts_unreduced_and_large_gradients():
    # module order [10, 3, 3, 10], bucket 5: the boundary backward runs 3, 2, 1, 0; the large tensors
    # (0 and 3) keep their own storage, the small ones move into the bucket as they are processed
    own = _zero1_flush_own((10, 3, 3, 10), 5)
    assert own == [20, 20, 23, 26]


def test_every_rank_holds_all_gradients_and_the_first_reduction_adds_its_partition():
    numels = [10, 3, 3, 10]
    parts = zero12_partitions(numels, 2, 5)
    # flat buffer 26 elements padded to 28: slices [0, 14) and [14, 28); tensor 2 ([13, 16)) straddles
    # rank 1's start, so both ranks' grads_in_partition hold it (rank 0: tensors 0-2, rank 1: 2-3)
    assert (parts[0].grad_buffer, parts[1].grad_buffer) == (16, 13)
    # rank 1: its first reduction (tensor 3, before tensor 2 enters the bucket) allocates its 13
    # elements while all 26 still hold their storage
    assert parts[1].held_zero1_accum == 26 + 13
    # rank 0: its first reduction (tensor 2's bucket) comes after tensor 2 moved into the bucket:
    # 23 held + 16, above the start of the boundary backward (26 + the large tensor 3 in flight)
    assert parts[0].held_zero1_accum == max(23 + 16, 26 + 10) == 39


def test_small_tensors_in_one_bucket_hold_exactly_the_model():
    """Every tensor fits the bucket (the tiny Llama): the peak is p x T, as measured on 4 ranks."""
    numels = [64, 32, 32, 64]
    for r in zero12_partitions(numels, 4, 1000):
        assert r.held_zero1_accum == sum(numels)
