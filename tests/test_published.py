"""Plan vs published GPU measurements (issue 19 points 1 and 3): benchmarks/published/*.yaml, planned in-process
by benchmarks/published.py (plan only, no GPU; ~2 s).

The issue's bar (every row's memory within 10%, median <= 5%; step time within 25%, median <= 15%) is not met
yet: it is asserted as a strict xfail with today's numbers in the reason, so the day it holds the xfail turns
into a failure and must be promoted. What holds today is a regression floor: no row's error grows by more
than FLOOR_MARGIN, and no row that is not under-estimated today becomes one (an under-estimate is an OOM on a
GPU). When a modelling change moves a row, update FLOOR (`python benchmarks/published.py --floor` prints it)
and say why in the commit.
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("published", ROOT / "benchmarks" / "published.py")
published = importlib.util.module_from_spec(_spec)
sys.modules["published"] = published
_spec.loader.exec_module(published)

FLOOR_MARGIN = 0.02
#: row id -> (memory error or None, time error or None) on 2026-12-05 with the allocator model
#: (compiler/allocator.py) and the runner's loss path (compiler/runner.py); error = plan / published - 1
#: 2026-12-05 (helper H): the 26 torchtune / Answer.AI rows that train in pure bf16 now say `precision: bf16_pure`
#: (torchtune `dtype: bf16`; Answer.AI train.py `--precision bf16`: torch_dtype bf16, mp_policy None, AdamW on the
#: bf16 params). 15 rows improved (8B full 1x4090 +377% -> +144% and fits; 3B full rows +48..+169% -> +10..+34%).
#: Worse, stated here and not silently: the Answer.AI rows lose the fp32 adapter/AdamW bytes the plan counted
#: (LoRA r64 on 7B: ~160M adapter params, 16 -> 8 B each), which had masked under-estimates from what those rows
#: still cannot express (FSDP1 flat params, their own loop): lora-noshard -0.5 -> -7.5%, qlora bs10 -10.2 ->
#: -13.6%, qlora ctx512 -4.0 -> -18.1%, qlora noshard -6.5 -> -13.6%, and three rows just below zero (70B offload
#: -0.0%, lora bs6 -0.4%, lora ctx2048 -1.1%); torchtune 405B QLoRA +7.5 -> +41.4% and 70B full cpuoffload +5.8 ->
#: +28.3%: with the smaller model state the planner no longer needs checkpoint offload (train.ckpt_offload auto),
#: which torchtune did not run either, so the plan keeps every checkpointed layer input on the GPU.
#: 2026-12-05 18:00 (helper D): every row pins train.tiled_mlp: off and train.ckpt_offload: off (no source ran
#: them; with the `auto` defaults the planner had added them where a row was tight): Answer.AI QLoRA bs 10 -13.6% ->
#: +19.9% (its plan had kept the checkpointed inputs in host RAM; now DOES NOT FIT on the 24 GB it ran on),
#: torchtune 8B full 1x4090 +144% -> +150% (DOES NOT FIT again);
#: a3ccdfc (ZeRO-3 QLoRA statistics whole on every rank) moved peft ZeRO-3 QLoRA -17.1% -> -15.8%.
#: 2026-12-05 (helper K): FSDP2's side-stream pools in the reserved figure (compiler/allocator.py predict,
#: phases.fsdp_side_stream_pools: the all-gather outputs of the root + one unit and the sharded gradients, which are
#: views into the reduce-scatter stream's output, are cached in those streams' segments): torchtitan 8B 8 x H100
#: -16.5 -> -9.1%, 128 x H100 -13.0 -> -9.1%, compile rows -10.6 -> -2.7% and -5.9 -> -1.7%; Answer.AI QLoRA ctx 512
#: -18.1 -> -14.6% (default allocator: never below the expandable-segments figure). No row got worse.
#: 2026-12-05 18:15 (helper D): re-based on HEAD; 7c40e5a (the chunked loss's lm_head instant holds one chunk)
#: lowered the torchtune chunked-CE rows by 2.5-6 points (3B full ac +9.6 -> +6.8%, qlora +33.1 -> +27.0%, ...);
#: 77f3a91 (FSDP2 side-stream pools in the reserved figure) is in the rows above as its commit states.
#: 2026-12-05 (helper N, issue 20 point 5): a layer's backward holds the MLP's gradients beside its saved tensors
#: (+2·p·I per token, was a bf16-fitted 8·h), the head holds the final norm's saved input + normalised tensor and
#: RoPE cos/sin, the chunked loss backward sums the lm_head gradient in autograd's input buffer: every memory row
#: moved UP (0.1..4.6 points; none down): under-estimates shrank (peft 70B LoRA FSDP -5.0 -> -1.9%, ZeRO-3
#: -4.4 -> -1.5%, QLoRA offload -19.6 -> -16.8%, torchtitan reserved -9.1 -> -8.7%), Answer.AI 70B QLoRA offload
#: -0.1 -> +3.6%; largest rises torchtune 8B full 1x4090 +149 -> +154%, 3B QLoRA +27.0 -> +32.2%.
FLOOR = {
    "answerai-llama2-70b-qlora-fsdp-offload-2x3090": (+0.036, None),
    "answerai-llama2-7b-lora-fsdp-bs4-2x3090": (+0.059, None),
    "answerai-llama2-7b-lora-fsdp-bs6-2x3090": (+0.009, None),
    "answerai-llama2-7b-lora-fsdp-ctx2048-2x3090-allocated": (-0.002, None),
    "answerai-llama2-7b-lora-fsdp-ctx512-2x3090-allocated": (+0.021, None),
    "answerai-llama2-7b-lora-noshard-bs4-2x3090": (-0.068, None),
    "answerai-llama2-7b-qlora-fsdp-bs10-2x3090": (+0.222, None),
    "answerai-llama2-7b-qlora-fsdp-bs4-2x3090": (+0.089, None),
    "answerai-llama2-7b-qlora-fsdp-ctx2048-2x3090": (+0.059, None),
    "answerai-llama2-7b-qlora-fsdp-ctx512-2x3090": (-0.144, None),
    "answerai-llama2-7b-qlora-noshard-bs8-2x3090": (-0.122, None),
    "peft-llama2-70b-lora-fsdp-8xh100": (-0.019, None),
    "peft-llama2-70b-lora-zero3-8xh100": (-0.015, None),
    "peft-llama2-70b-qlora-fsdp-nooffload": (-0.057, None),
    "peft-llama2-70b-qlora-fsdp-offload-2x24gb": (-0.168, None),
    "peft-llama2-70b-qlora-zero3-2x40gb": (-0.145, None),
    "philschmid-llama3-70b-qlora-fsdp-offload-4xa10g": (+0.019, None),
    "torchtitan-llama3-70b-fsdp-64xa100-full": (None, +0.875),
    "torchtitan-llama3-8b-fsdp-64xa100-selective-layer": (None, +0.814),
    "torchtitan-llama3-8b-fsdp-64xa100-selective-op": (None, +0.813),
    "torchtitan-llama3.1-8b-fsdp-128xh100": (-0.087, -0.059),
    "torchtitan-llama3.1-8b-fsdp-8xh100": (-0.087, -0.186),
    "torchtitan-llama3.1-8b-fsdp-compile-128xh100": (-0.013, +0.093),
    "torchtitan-llama3.1-8b-fsdp-compile-8xh100": (-0.023, -0.059),
    "torchtune-llama3.1-405b-qlora-8xa100": (+0.420, None),
    "torchtune-llama3.1-70b-full-8xa100-cpuoffload": (+0.310, None),
    "torchtune-llama3.1-70b-lora-8xa100": (+0.128, None),
    "torchtune-llama3.1-8b-full-1x4090": (+1.538, +0.526),
    "torchtune-llama3.1-8b-lora-1x4090": (+0.065, +1.149),
    "torchtune-llama3.1-8b-qlora-1x4090": (+0.081, +1.103),
    "torchtune-llama3.2-3b-full-1xa100-ac": (+0.083, +0.507),
    "torchtune-llama3.2-3b-full-1xa100-act-offload": (+0.236, +0.526),
    "torchtune-llama3.2-3b-full-1xa100-adamw8bit": (+0.197, +0.455),
    "torchtune-llama3.2-3b-full-1xa100-chunked-ce": (+0.327, +0.452),
    "torchtune-llama3.2-3b-full-1xa100-compile": (+0.317, +0.374),
    "torchtune-llama3.2-3b-full-1xa100-opt-in-bwd": (+0.167, +0.528),
    "torchtune-llama3.2-3b-full-1xa100-packed": (+0.119, +0.080),
    "torchtune-llama3.2-3b-lora-1xa100": (+0.174, +0.299),
    "torchtune-llama3.2-3b-qlora-1xa100": (+0.322, +0.589),
}

#: what the issue asks every row's setup to state (a value, or `unknown` where the source does not say)
SETUP_KEYS = ("model", "method", "lora_targets", "lora_rank", "precision", "seq_len", "micro_batch", "world_size",
              "strategy", "grad_ckpt", "loss", "compile", "offload")


@pytest.fixture(scope="module")
def results():
    return [published.evaluate(r) for r in published.load_table()]


def test_table_has_25_rows_from_5_sources_each_with_its_quote_and_setup(results):
    s = published.summarize(results)
    assert s["mem_rows"] >= 25 and s["sources"] >= 5, s
    for r in results:
        assert r.row.url.startswith("https://") and len(r.row.quote) > 10, r.row.id
        assert all(k in r.row.setup for k in SETUP_KEYS), (r.row.id, set(SETUP_KEYS) - set(r.row.setup))
        assert r.row.metric in published.METRICS
        assert (r.row.peak_lo is None and r.row.tokens_per_s_per_gpu) or 0 < r.row.peak_lo <= r.row.peak_hi, r.row.id


def test_every_row_is_in_the_floor(results):
    # a new row needs its figures in FLOOR (so the floor covers the whole table, not a chosen part of it)
    assert {r.row.id for r in results} == set(FLOOR)


def test_regression_floor_no_row_worse_and_no_new_under_estimate(results):
    worse = []
    for r in results:
        mem0, time0 = FLOOR[r.row.id]
        if (mem0 is None) != (r.mem_err is None):
            worse.append(f"{r.row.id}: a memory figure appeared or vanished (floor {mem0}, now {r.mem_err})")
        elif mem0 is not None:  # None: a time-only row
            if abs(r.mem_err) > abs(mem0) + FLOOR_MARGIN:
                worse.append(f"{r.row.id}: memory {r.mem_err:+.1%} (floor {mem0:+.1%})")
            if r.mem_err < min(mem0, 0.0) - FLOOR_MARGIN or (mem0 >= 0 and r.mem_err < 0):
                worse.append(f"{r.row.id}: memory under-estimated {r.mem_err:+.1%} (floor {mem0:+.1%})")
        if (time0 is None) != (r.time_err is None):
            worse.append(f"{r.row.id}: a time figure appeared or vanished (floor {time0}, now {r.time_err})")
        elif time0 is not None and abs(r.time_err) > abs(time0) + FLOOR_MARGIN:
            worse.append(f"{r.row.id}: time {r.time_err:+.1%} (floor {time0:+.1%})")
    assert not worse, "\n".join(worse)


def _bar_failures(results) -> list[str]:
    mem = [abs(r.mem_err) for r in results if r.mem_err is not None]
    times = [abs(r.time_err) for r in results if r.time_err is not None]
    out = [f"{r.row.id}: memory {r.mem_err:+.1%}" for r in results if r.mem_err is not None and abs(r.mem_err) > 0.10]
    out += [f"{r.row.id}: time {r.time_err:+.1%}" for r in results if r.time_err is not None and abs(r.time_err) > 0.25]
    if statistics.median(mem) > 0.05:
        out.append(f"memory median |err| {statistics.median(mem):.1%} > 5%")
    if times and statistics.median(times) > 0.15:
        out.append(f"time median |err| {statistics.median(times):.1%} > 15%")
    return out


@pytest.mark.xfail(strict=True, reason="issue 19 bar not met (2026-12-05 19:00): memory median |err| 8.8%, 19/36 rows "
                   "within 10%, 13 under-estimates (PEFT FSDP-QLoRA offload -17%, ZeRO-3 QLoRA -15%, Answer.AI QLoRA "
                   "ctx 512 -14% and NO_SHARD bs 8 -12% but bs 10 +22%, torchtitan reserved -9%); torchtune rows (pure "
                   "bf16) need optimizer_in_bwd and torchtune's chunked CE (up to +154%); time median 50.7%, 5/19 "
                   "within 25% (the plan is ~45% slow on A100/4090, up to 19% fast on torchtitan's 500 W H100). See "
                   "benchmarks/published.py output.")
def test_issue_bar_every_row_within_10pct_median_5pct_time_25_15(results):
    failures = _bar_failures(results)
    assert not failures, "\n".join(failures)


def test_bad_row_file_is_one_line_naming_file_and_key(tmp_path):
    src = ROOT / "benchmarks" / "published" / "torchtune-llama3.1-8b-qlora-1x4090.yaml"
    bad = tmp_path / "torchtune-llama3.1-8b-qlora-1x4090.yaml"
    bad.write_text(src.read_text().replace("peak_memory: 7.4 GiB", "peak_memory: '7.4'"))
    with pytest.raises(published.TableError) as e:
        published.load_row(bad)
    msg = str(e.value)
    assert "\n" not in msg and bad.name in msg and "peak_memory" in msg and "GiB" in msg
    assert published.main(["--dir", str(tmp_path)]) == 2
    # an assumed metric only for a row whose source does not say, and only with its reason
    src2 = ROOT / "benchmarks" / "published" / "peft-llama2-70b-qlora-zero3-2x40gb.yaml"
    bad2 = tmp_path / src2.name
    bad2.write_text(src2.read_text().replace("metric: unknown", "metric: reserved"))
    with pytest.raises(published.TableError, match="metric_assumed"):
        published.load_row(bad2)


def test_range_error_is_zero_inside_and_measured_from_the_near_end():
    lo, hi = published.parse_bytes("72-80 GiB", "t")
    assert published.mem_error(76 * 2**30, lo, hi) == 0.0
    assert published.mem_error(88 * 2**30, lo, hi) == pytest.approx(0.10)
    assert published.mem_error(36 * 2**30, lo, hi) == pytest.approx(-0.5)
    assert published.parse_bytes("1 GB", "t") == (10**9, 10**9)


def test_only_and_terms_show_the_chosen_row_and_its_peak_terms(capsys):
    row = "peft-llama2-70b-lora-zero3-8xh100"
    assert published.main(["--only", row, "--terms"]) == 0
    out = capsys.readouterr().out
    assert row in out and "(1 of" in out and "at the peak (GiB):" in out and "activations=" in out
    assert published.main(["--only", "no-such-row"]) == 2
    assert "no-such-row" in capsys.readouterr().err
