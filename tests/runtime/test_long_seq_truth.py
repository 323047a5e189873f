"""Issue 20, point 5: the measured truth of the per-rank peak at long sequence, on CPU, one scenario per
memory saver on and off.

A small Llama (hidden 64, MLP 224 = 3.5 x hidden as in Llama, 2 layers, 2 heads / 1 kv head, vocab 32,000
so the logits path is as large as it is on real models, rope over 16,384 positions) trains one step at
seq 16,384 through the project's own worker (`run.memory_trace: true`: PyTorch's MemTracker in *real*
mode, runtime/memtrace.py), in ONE launch of one process (world size 1, gloo; several scenarios per
launch, tests/runtime/driver.py). fp32, because the CPU has no fast bf16 matmul and the plan's fp32 terms
are the same formulas with 4 bytes per element (tests/runtime/test_peak_truth.py does the same).

Each scenario's measured peak must lie within -2% / +10% of the plan's peak (the plan's total minus
`cuda_context`, which no tensor holds): a plan below the truth is an OOM on a GPU, so the band is
asymmetric (common rule; issue 19). Measured on the second step (the worker's `measure_at`): DDP's
gradient buckets and the optimizer states exist then, as on every later step. (The first step is not
the steady state: the tracker cannot see the buckets allocated before it, and the lm_head's first
gradient is a fresh tensor that a later step accumulates into its bucket.)

Scenarios (saver on / off pairs against `ckpt_full`): checkpointing none vs full, the full loss vs the
chunked one, activation offload (save_on_cpu), tiled MLP, checkpoint offload. On a CPU run "host" and
"device" are the same memory: what the two offloads move stays in the tracked process (MemTracker files
it under the cpu device either way), so their saving itself shows only on CUDA. Here their prediction
is the plan's device peak plus the bytes the plan puts in host RAM for them (compiler/activations.py
activation_host_bytes; compiler/savers.py ckpt_input_bytes per checkpointed layer): the check is that
offloading adds nothing the plan does not know of (copies, prefetches) — not the size of the drop. Host RAM per scenario:
< 7.1 GB (the full loss at 16,384 x 32,000 holds three fp32 logits-sized tensors, 2.1 GB each; the
one process reaches 9.7 GB RSS over the launch: the allocator keeps freed pages).

Cost (2026-12-05, a shared 2-core machine, load 5-14): 482 s wall, 295 s user + 14 s sys CPU for the
launch (6 scenarios x 2 steps at 2 threads; the two scenarios that ran at the lowest load took 13.5 s wall
each, the full loss ~30-50 s): roughly 2 min on 2 idle cores, over the 90 s target. The floor is the
logits path: 16,384 x 32,000 lm_head + fp32 cross-entropy forward, chunk recompute and backward on every
step, and the traced step costs about twice an untraced one (MemTracker's dispatch mode on every op).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from conftest import run_driver

pytestmark = pytest.mark.multiproc

SEQ = 16_384
CHUNK = 128
"""Tokens per loss chunk: small, so that a layer's recompute + backward (not the loss chunk) is the peak
of the checkpointed scenarios and the savers that act there (tiled MLP, checkpoint offload) show."""
PLAN_UNDER = 0.02
"""The plan may be at most 2% below the measured peak ..."""
PLAN_OVER = 0.10
"""... and at most 10% above it (issue 20: "measured peak vs plan within 10%")."""
LAUNCH_TIMEOUT_S = 1800

MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 224,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 32_000,
    "max_position_embeddings": SEQ, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
}

#: name -> train keys (on top of BASE_TRAIN); each saver's "off" is ckpt_full unless named
SCENARIOS = {
    "ckpt_none": {"grad_ckpt": "none"},
    "ckpt_full": {"grad_ckpt": "full"},
    "loss_full": {"grad_ckpt": "full", "loss": "full"},
    "act_offload": {"grad_ckpt": "full", "activation_offload": "cpu"},
    "ckpt_offload": {"grad_ckpt": "full", "ckpt_offload": "cpu"},
    "tiled_mlp": {"grad_ckpt": "full", "tiled_mlp": 8},   # last: a scenario error stops the launch
}
BASE_TRAIN = {"strategy": "ddp", "precision": "fp32", "seq_len": SEQ, "micro_batch": 1, "global_batch": 1,
              "steps": 2, "loss": "chunked", "loss_chunk_tokens": CHUNK, "tiled_mlp": "off", "ckpt_offload": "off"}

#: Measured vs plan (2026-12-05, second step, plans of 98a611f: the layer backward's MLP gradients, the final
#: norm's tensors + RoPE cos/sin in the head, the chunked loss's lm_head gradient buffer; before it five scenarios
#: were 4.7-10.3% under): ckpt_none 348.0 MB vs 347.0 (-0.3%, the loss backward), ckpt_full 210.6 vs 222.5 (+5.7%),
#: loss_full -0.0%, act_offload 210.7 vs 226.7 (+7.6%), ckpt_offload 210.6 vs 226.7 (+7.7%; the recomputing input counted once: predicted_phases), tiled_mlp 154.6 vs
#: 154.0 (-0.4%); all peaks in the backward. The over-estimate of the checkpointed runs is the plan's conservative
#: layer backward (one tile / one layer's saved set held whole while its MLP gradients are live).
#: Last run: 11 passed, 639 s wall (the machine loaded with two other test launches and the calibration grid).


def _over(model: Path, train: dict) -> dict:
    return {"model": {"name": str(model)}, "hardware": {"gpus_per_node": 1}, "data": {"train": "demo"},
            "run": {"memory_trace": True, "device": "cpu"}, "train": {**BASE_TRAIN, **train}}


def force_activation_offload(d: Path) -> None:
    """`activation_offload: cpu` is a permission the planner uses only when nothing faster fits; here the
    chosen candidate is re-planned with it on (compiler/planner.py evaluate_phases, the one place that
    assembles a candidate's phases), so the plan's per-phase bytes are the prediction for that run."""
    from shardtrain.compiler.inventory import tensor_inventory
    from shardtrain.compiler.plan import Plan
    from shardtrain.compiler.planner import evaluate_phases
    from shardtrain.compiler.specs import ActivationOffload
    from shardtrain.config.resolve import resolve_specs
    from shardtrain.config.schema import parse_run_config
    from rundirs import write_plan
    cfg = parse_run_config(yaml.safe_load((d / "run.yaml").read_text()))
    model, hw, train = resolve_specs(cfg)
    p = Plan.from_json(json.loads((d / "plan.json").read_text()))
    c = p.chosen
    groups = tensor_inventory(model, c.method)
    _, phases, peak = evaluate_phases(model, hw, train, groups, c.strategy, method=c.method, optimizer=c.optimizer,
                                      micro=c.micro_batch_size, ckpt=c.gradient_checkpointing,
                                      defer=c.fsdp_defer_grad_sync, loss=c.loss, act_offload=ActivationOffload.CPU,
                                      parallel=c.parallel, tiles=c.tiled_mlp_tiles, ckpt_offload=c.ckpt_offload)
    chosen = dataclasses.replace(c, activation_offload=ActivationOffload.CPU, per_phase=tuple(phases.items()),
                                 peak_phase=peak, per_gpu=phases[peak])
    write_plan(d, cfg, dataclasses.replace(p, chosen=chosen))


EDITS = {"act_offload": force_activation_offload}


def launch(base: Path, scenarios: dict) -> dict:
    """One torchrun launch of tests/runtime/driver.py (conftest.run_driver), one process at two threads
    (the other launches run 2 ranks at one thread each; one rank here gets both cores). A scenario that
    raises stops the launch; the ones before it keep their results (its own result carries the error)."""
    model = base / "long-llama-32k.json"
    model.write_text(json.dumps(MODEL))
    return run_driver(base, [{"name": name, "over": _over(model, train), "plan_edit": EDITS.get(name)}
                             for name, train in scenarios.items()],
                      nproc=1, timeout=LAUNCH_TIMEOUT_S, threads=2, keep_going=True)


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("long_seq_truth"), SCENARIOS)


def measured_phases(run_dir: Path) -> dict[str, dict]:
    """{phase: {"total", "terms"}}: the traced peak of each phase of the measured step, without gloo's
    collective temporaries (none at world size 1), from memory_rank0.json."""
    rec = json.loads((run_dir / "memory_rank0.json").read_text())
    return rec["memory_trace"]["no_comm_temp"]["per_phase"]


def offloaded_bytes(run_dir: Path) -> int:
    """What the plan puts in host RAM for activation / checkpoint offload on this rank (same memory as the
    "device" on a CPU run: module docstring)."""
    from shardtrain.compiler.activations import activation_host_bytes, checkpointed_layer_count
    from shardtrain.compiler.plan import Plan
    from shardtrain.compiler.savers import ckpt_input_bytes
    from shardtrain.config.resolve import resolve_specs
    from shardtrain.config.schema import parse_run_config
    model, _hw, train = resolve_specs(parse_run_config(yaml.safe_load((run_dir / "run.yaml").read_text())))
    c = Plan.from_json(json.loads((run_dir / "plan.json").read_text())).chosen
    tokens = c.micro_batch_size * train.seq_len
    host = activation_host_bytes(model, micro_batch=c.micro_batch_size, seq_len=train.seq_len,
                                 precision=c.precision, attention=train.attention, grad_ckpt=c.gradient_checkpointing,
                                 selective_every=train.selective_every, offload=c.activation_offload)
    if c.ckpt_offload:
        n_ck = checkpointed_layer_count(c.gradient_checkpointing, model.num_layers, train.selective_every)
        host += n_ck * ckpt_input_bytes(model, c.precision, tokens)
    return host


def predicted_phases(run_dir: Path) -> tuple[dict[str, int], str]:
    """The plan's bytes per phase without cuda_context, plus what it offloads to the host (module docstring)."""
    from shardtrain.compiler.plan import Plan
    c = Plan.from_json(json.loads((run_dir / "plan.json").read_text())).chosen
    host = offloaded_bytes(run_dir)
    pred = {p: v.total - v.cuda_context + (host if p != "optimizer" else 0) for p, v in c.per_phase}
    if c.ckpt_offload:
        # on a CPU run the stash's unpack (runtime/ckpt_offload.py HostStash.unpack: `t.to(device)` with device
        # cpu) returns the host copy itself: the input of the layer recomputing, which the plan keeps on the
        # device in the backward, IS one of the host tensors counted above (on CUDA it is a separate copy)
        pred["backward"] -= _ckpt_input(run_dir)
    return pred, c.peak_phase


def _ckpt_input(run_dir: Path) -> int:
    """One checkpointed layer's input on this rank (compiler/savers.py ckpt_input_bytes)."""
    from shardtrain.compiler.plan import Plan
    from shardtrain.compiler.savers import ckpt_input_bytes
    from shardtrain.config.resolve import resolve_specs
    from shardtrain.config.schema import parse_run_config
    model, _hw, train = resolve_specs(parse_run_config(yaml.safe_load((run_dir / "run.yaml").read_text())))
    c = Plan.from_json(json.loads((run_dir / "plan.json").read_text())).chosen
    return ckpt_input_bytes(model, c.precision, c.micro_batch_size * train.seq_len)


def _result(truth: dict, name: str) -> Path:
    res = truth[name]
    if "error" in res:
        pytest.fail(f"scenario {name} did not run: {res['error']}\n{res.get('traceback', '')[-3000:]}")
    return Path(res["run_dir"])


def _terms(d: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in d.items() if v and k != "total")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_measured_peak_matches_plan(truth, name):
    d = _result(truth, name)
    meas = measured_phases(d)
    states = json.loads((d / "memory_rank0.json").read_text())["measured"]   # the state meter, after the step
    for t in ("grads", "optimizer_states"):  # the steady state: the trace saw them from the forward on
        assert meas["forward"]["terms"][t] == int(states[t]), (t, meas["forward"]["terms"][t], states[t])
    pred, pred_peak = predicted_phases(d)
    m_peak = max(meas, key=lambda p: meas[p]["total"])
    measured, predicted = meas[m_peak]["total"], pred[pred_peak]
    err = (predicted - measured) / measured
    from shardtrain.compiler.plan import Plan
    c = Plan.from_json(json.loads((d / "plan.json").read_text())).chosen
    plan_terms = {p: _terms(v.to_json()) for p, v in c.per_phase}
    assert -PLAN_UNDER <= err <= PLAN_OVER, (
        f"{name}: plan peak {predicted:,} B ({pred_peak}) vs measured {measured:,} B ({m_peak}): {err:+.1%} "
        f"(band -{PLAN_UNDER:.0%} / +{PLAN_OVER:.0%}); measured per phase: "
        + "; ".join(f"{p} {v['total']:,} [{_terms(v['terms'])}]" for p, v in meas.items())
        + "; plan per phase: " + "; ".join(f"{p} {pred[p]:,} [{plan_terms[p]}]" for p in pred))


SAVER_RAN = {  # scenario -> (plan.json key, value, the worker's "memory savers" log words)
    "ckpt_none": ("gradient_checkpointing", "none", "activation checkpointing off"),
    "ckpt_full": ("gradient_checkpointing", "full", "activation checkpointing full (2 layers)"),
    "ckpt_offload": ("ckpt_offload", True, "checkpointed layer inputs in host memory"),
    "tiled_mlp": ("tiled_mlp_tiles", 8, "tiled MLP 8 tiles (2 layers)"),
}


@pytest.mark.parametrize("name", list(SAVER_RAN))
def test_savers_planned_and_run(truth, name):
    """The plan chose the saver and the worker says it ran it (not a run that merely had the key set)."""
    d = _result(truth, name)
    key, want, words = SAVER_RAN[name]
    plan = json.loads((d / "plan.json").read_text())
    assert plan[key] == want, (key, plan[key])
    log = "".join(p.read_text() for p in (d / "logs").glob("*.log"))
    assert words in log, [ln for ln in log.splitlines() if "memory savers" in ln]


def test_loss_and_offload_paths(truth):
    """The full-loss and activation-offload runs really took those paths (plan keys the runtime reads)."""
    full = json.loads((_result(truth, "loss_full") / "plan.json").read_text())
    off = json.loads((_result(truth, "act_offload") / "plan.json").read_text())
    assert full["loss"] == "full" and off["loss"] == "chunked" and off["activation_offload"] == "cpu"
    # the full loss holds whole-sequence fp32 logits: its measured peak is far above the chunked one's
    big, small = (max(v["total"] for v in measured_phases(_result(truth, n)).values()) for n in ("loss_full", "ckpt_full"))
    assert big > 2 * SEQ * MODEL["vocab_size"] * 4 > small
