"""issue 20 point 1: `shardtrain plan --max seq-len | micro-batch | global-batch` (compiler/maxfit.py,
shardtrain/plan_max.py). Pure python, the real planner and config pipeline; one subprocess CLI call."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from shardtrain.cli import main
from shardtrain.compiler.maxfit import MaxKey, find_max, train_at
from shardtrain.compiler.plan import MEMORY_TERMS
from shardtrain.compiler.planner import NoFitError, PlanningError, plan
from shardtrain.config.flags import overrides_from_args
from shardtrain.config.pipeline import load
from shardtrain.config.resolve import resolve_specs
from shardtrain.report import render_max


def _specs(*argv: str):
    """(model, hw, train) exactly as `shardtrain plan ARGV` resolves them."""
    from shardtrain.cli import build_parser
    args = build_parser().parse_args(["plan", *argv])
    return resolve_specs(load(args.config, overrides_from_args(args)))


def _fits(model, hw, train) -> bool:
    try:
        return plan(model, hw, train).chosen.fits
    except NoFitError:
        return False


def _check_edge(model, hw, train, r) -> None:
    """The answer is at the edge: the value fits and value + step does not, re-planned from scratch."""
    assert r.value % r.step == 0 and r.next_value == r.value + r.step
    assert _fits(model, hw, train_at(r.key, r.value, hw, train))
    assert not _fits(model, hw, train_at(r.key, r.next_value, hw, train))
    assert r.plan.chosen.fits


GPUS = pytest.mark.parametrize("gpus", [1, 8])


@GPUS
def test_max_seq_len_8b(gpus):
    model, hw, train = _specs("--model", "llama-3.1-8b", "--gpus-per-node", str(gpus))
    r = find_max(model, hw, train, MaxKey.SEQ_LEN)
    _check_edge(model, hw, train, r)
    assert r.plan.train.seq_len == r.value and r.plan.train.global_batch_size == train.global_batch_size
    assert r.value >= 16 * 1024  # 8B trains at 16k on one 80 GB GPU with checkpointing (and far longer on 8)
    assert r.limited_by in MEMORY_TERMS and r.term_bytes == max(getattr(_least(model, hw, train, r).per_gpu, t)
                                                                for t in MEMORY_TERMS)
    assert r.next_needs_bytes > r.usable_bytes
    text = render_max(r)
    assert f"seq {r.value:,} fits; at {r.next_value:,} the " in text
    assert f"job        seq {r.value}," in text and "per GPU" in text  # the plan at the value follows


def _least(model, hw, train, r):
    with pytest.raises(NoFitError) as e:
        plan(model, hw, train_at(r.key, r.next_value, hw, train))
    return e.value.plan.chosen


def test_more_gpus_reach_longer_sequences():
    m1, h1, t1 = _specs("--model", "llama-3.1-8b", "--gpus-per-node", "1")
    m8, h8, t8 = _specs("--model", "llama-3.1-8b", "--gpus-per-node", "8")
    one, eight = find_max(m1, h1, t1, MaxKey.SEQ_LEN), find_max(m8, h8, t8, MaxKey.SEQ_LEN)
    assert eight.value > 4 * one.value and eight.plan.parallel.cp > 1  # context parallel shards the sequence


@GPUS
def test_max_micro_batch_8b(gpus):
    model, hw, train = _specs("--model", "llama-3.1-8b", "--gpus-per-node", str(gpus))
    r = find_max(model, hw, train, MaxKey.MICRO_BATCH)
    _check_edge(model, hw, train, r)
    c = r.plan.chosen
    assert c.micro_batch_size == r.value and r.plan.train.global_batch_size == r.value * gpus
    assert c.micro_batch_size * c.grad_accum_steps * r.plan.parallel.dp == r.plan.train.global_batch_size
    assert r.limited_by in MEMORY_TERMS
    assert f"micro batch {r.value:,} fits; at {r.value + 1:,} the " in render_max(r)


def test_max_global_batch_is_micro_times_dp():
    model, hw, train = _specs("--model", "llama-3.1-8b", "--gpus-per-node", "8", "--tp", "1", "--cp", "1")
    r = find_max(model, hw, train, MaxKey.GLOBAL_BATCH)
    assert r.step == 8
    _check_edge(model, hw, train, r)
    micro = find_max(model, hw, train, MaxKey.MICRO_BATCH)
    assert r.value == 8 * micro.value and r.plan.chosen.grad_accum_steps == 1


def test_flags_compose_forced_cp_and_chunked_loss():
    base = ("--model", "llama-3.1-8b", "--gpus-per-node", "8", "--cp", "4")
    model, hw, train = _specs(*base, "--loss", "full")   # auto (the default) would chunk by itself
    full = find_max(model, hw, train, MaxKey.SEQ_LEN)
    assert full.plan.parallel.cp == 4 and full.value % 4 == 0
    _check_edge(model, hw, train, full)
    model, hw, chunked_train = _specs(*base, "--loss", "chunked")
    chunked = find_max(model, hw, chunked_train, MaxKey.SEQ_LEN)
    assert chunked.plan.parallel.cp == 4 and chunked.plan.chosen.loss.value == "chunked"
    assert chunked.value > full.value  # the chunked loss never holds the whole fp32 logits


def test_host_ram_limit_is_named():
    model, hw, train = _specs("--model", "llama-3.1-8b", "--gpus-per-node", "8", "--cpu-memory", "64GiB",
                              "--activation-offload", "cpu")
    r = find_max(model, hw, train, MaxKey.SEQ_LEN)
    _check_edge(model, hw, train, r)
    assert r.limited_by == "host_ram" and r.term_bytes > hw.cpu_memory_bytes
    assert "host RAM runs out" in render_max(r)


def test_search_finds_the_exact_edge_with_few_plans():
    """The search itself, on a planner that fits up to a known threshold (the real plans returned)."""
    model, hw, train = _specs("--model", "llama-3.1-8b", "--gpus-per-node", "1")
    ok = plan(model, hw, train)
    with pytest.raises(NoFitError) as e:
        plan(model, hw, dataclasses.replace(train, seq_len=1 << 20))
    for limit in (1024, 1500, 5 * 1024, 300_000, 1_000_000):
        calls = []

        def fake(m, h, t, limit=limit, calls=calls):
            calls.append(t.seq_len)
            if t.seq_len > limit:
                raise NoFitError("too long", e.value.plan)
            return ok
        r = find_max(model, hw, train, MaxKey.SEQ_LEN, planner=fake)
        assert r.value == limit // 1024 * 1024 and r.next_value == r.value + 1024
        assert len(calls) <= 2 * (limit // 1024).bit_length() + 2


def test_nothing_fits_exits_2_with_one_line(capsys):
    rc = main(["plan", "--model", "llama-3.1-70b", "--gpus-per-node", "1", "--gpu-memory", "24GiB",
               "--cpu-memory", "64GiB", "--max", "seq-len"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardtrain: --max seq-len: at seq 1,024, the smallest value, ")
    assert "To fit, try" in lines[0]  # the re-planned suggestions, as plain `plan` gives them


def test_refusals_are_one_line(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--max", "seq-len", "--seq-len", "4096"]) == 1
    assert main(["plan", "--model", "llama-3.1-8b", "--max", "global-batch", "--micro-batch", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "drop it" in err[0] and "--max micro-batch" in err[1]
    with pytest.raises(PlanningError):
        model, hw, train = _specs("--model", "llama-3.1-8b", "--micro-batch", "2")
        find_max(model, hw, train, MaxKey.GLOBAL_BATCH)


def test_cli_json_shape():
    out = subprocess.run([sys.executable, "-m", "shardtrain", "plan", "--model", "llama-3.1-8b", "--gpus-per-node",
                          "1", "--max", "micro-batch", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    mx = d["max"]
    assert set(mx) == {"key", "value", "step", "limited_by", "limited_by_bytes", "limited_by_part",
                       "limited_by_part_bytes", "next", "next_needs_bytes",
                       "usable_bytes", "detail"}
    assert mx["key"] == "micro_batch" and mx["next"] == mx["value"] + 1 and mx["limited_by"] in MEMORY_TERMS
    assert d["micro_batch_size"] == mx["value"] and d["fits"] is True and "spec" not in d
    assert mx["next_needs_bytes"] > mx["usable_bytes"] == d["gpu_memory_bytes"] - d["headroom_bytes"]
