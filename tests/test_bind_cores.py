"""CPU ranks bound to their own cores (runtime/dist.py cpu_cores_for_rank, run.bind_cpu_cores; issue 11)."""
from __future__ import annotations

import os

import pytest

from shardtrain.runtime.dist import bind_cpu_cores, cpu_cores_for_rank


def test_equal_contiguous_blocks():
    cores = [5, 1, 3, 0, 2, 4, 7, 6]
    assert [cpu_cores_for_rank(cores, r, 2, 2) for r in range(2)] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [cpu_cores_for_rank(cores, r, 3, 3) for r in range(3)] == [(0, 1), (2, 3), (4, 5)]  # 6, 7: nobody's
    assert cpu_cores_for_rank([0, 1], 1, 2, 2) == (1,)


@pytest.mark.parametrize("cores,lr,lw,w", [([0, 1, 2, 3], 0, 1, 1),   # one rank: nothing to separate
                                           ([0, 1], 0, 4, 4),         # fewer cores than ranks
                                           ([0, 1, 2, 3], 1, 2, 4)])  # two "nodes" may share this machine
def test_no_binding(cores, lr, lw, w):
    assert cpu_cores_for_rank(cores, lr, lw, w) == ()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_bind_sets_this_process_mask(monkeypatch):
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip("needs 2 usable cores")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "2")  # the deepspeed launcher's name for it
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        got = bind_cpu_cores()
        assert got == cpu_cores_for_rank(tuple(before), 1, 2, 2) and os.sched_getaffinity(0) == set(got)
    finally:
        os.sched_setaffinity(0, before)
