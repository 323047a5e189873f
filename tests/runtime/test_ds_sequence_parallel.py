"""Issue 18 acceptance: Ulysses context parallel on 4 gloo ranks, dp 2 × cp 2, against the 1-D run (dp 4)
of the same global batch, model init and seed.

1. Engine level (tests/runtime/cp_driver.py, one torchrun launch): DeepSpeed ZeRO-2 and ZeRO-3 with
   DeepSpeed's own ALST (runtime/ds_sequence_parallel.py, through runtime/engines.py DeepSpeedEngine) and
   FSDP2 (fully_shard over all 4 ranks) with our install_ulysses (runtime/context_parallel.py); the loop is
   worker.train_step's loss normalisation (token-loss sum × grad_reduce × engine.loss_multiplier / global
   labelled tokens). Plain SGD without clipping: the update is proportional to the gradient, so any factor
   in the gradient reduction shows (AdamW and clipping hide one: this is how ZeRO-3's different sp
   averaging was found, see ds_sequence_parallel.py). Tolerance SGD_ATOL.
2. Worker level (run directories from the planner with parallel: {dp_shard: 2, cp: 2, cp_mode: ulysses};
   DeepSpeed reads sequence_parallel_size from the emitted ds_config.json): AdamW with clipping, ZeRO-2 and
   ZeRO-3 (the latter with full activation checkpointing and the chunked loss), losses, eval loss and
   final parameters. Adam divides by sqrt(v), which amplifies fp32 reduction-order noise in near-zero
   gradients: tolerance PARAM_ATOL, the repo's engine-equivalence bound (tests/runtime/test_equivalence.py).
   FSDP2 cp 2 × dp_shard 2 at worker level is in tests/runtime/test_mesh_runs.py.
The measured maxima are printed (pytest -s) and recorded in the report.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardtrain.runtime.ds_sequence_parallel import loss_scale_for_sp, sp_size

pytestmark = pytest.mark.multiproc
HERE = Path(__file__).resolve().parent
WORLD, STEPS = 4, 3
LOSS_RTOL = 1e-6
SGD_LR = 0.5      # large enough that the weights move ~1e-2 (a wrong gradient factor moves them by as much)
SGD_ATOL = 1e-5
PARAM_ATOL = 2e-5
#: (engine, ZeRO stage) pairs, each run 1-D and with cp 2
ENGINES = (("deepspeed", 2), ("deepspeed", 3), ("fsdp2", 0))


def _name(engine, zero, cp, opt):
    return f"{engine}{zero or ''}_{'cp2' if cp > 1 else '1d'}_{opt}"


@pytest.fixture(scope="module")
def cp_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp_runs")
    scenarios = []
    for engine, zero in ENGINES:
        # the cp run first: the 1-D run after it checks that close() undid ALST's process-wide state
        for cp in (2, 1):
            scenarios.append({"name": _name(engine, zero, cp, "sgd"), "engine": engine, "zero": zero, "cp": cp,
                              "optimizer": "sgd", "lr": SGD_LR, "clip": 0.0})
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "steps": STEPS, "seq": 32, "global_batch": 4,
                                "scenarios": scenarios}))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           str(HERE / "cp_driver.py"), str(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    (out / "driver.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise AssertionError(f"cp_driver failed (rc {proc.returncode}):\n" + (proc.stdout + proc.stderr)[-6000:])
    res = {sc["name"]: torch.load(out / f"{sc['name']}.pt") for sc in scenarios}
    return res


def _compare(cp_runs, engine, zero, opt):
    a, b = cp_runs[_name(engine, zero, 2, opt)], cp_runs[_name(engine, zero, 1, opt)]
    worst = max((a["params"][k] - b["params"][k]).abs().max().item() for k in b["params"])
    loss_rel = max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"]))
    norm_rel = max(abs(x - y) / abs(y) for x, y in zip(a["grad_norms"], b["grad_norms"]))
    print(f"\n{engine}{zero or ''} {opt}: cp2 vs 1-D: max |param diff| {worst:.3g}, loss rel {loss_rel:.3g}, "
          f"grad-norm rel {norm_rel:.3g}, losses {a['losses']}")
    assert set(a["params"]) == set(b["params"]) and len(a["losses"]) == STEPS
    assert a["sdpa_restored"] and b["sdpa_restored"]
    return worst, loss_rel, norm_rel


@pytest.mark.parametrize("engine,zero", ENGINES)
def test_cp2_sgd_equals_1d(cp_runs, engine, zero):
    """Plain SGD, no clipping: the cp run's gradients are the 1-D run's (no factor of cp anywhere)."""
    worst, loss_rel, norm_rel = _compare(cp_runs, engine, zero, "sgd")
    assert loss_rel < LOSS_RTOL and norm_rel < LOSS_RTOL
    assert worst < SGD_ATOL, f"max |param(cp2) - param(1-D)| = {worst:.3g}"
    moved = cp_runs[_name(engine, zero, 1, "sgd")]["moved"]
    assert moved > 100 * SGD_ATOL, f"the runs hardly trained (largest change {moved:.3g}): the comparison is vacuous"


def test_loss_scale_for_sp():
    """ZeRO-1/2 sum gradients over sp (1/sp), ZeRO-3's reduce-scatter averages (1); ZeRO-3 without
    reduce_scatter mixes both and is refused in one line."""
    assert [loss_scale_for_sp(1, 2, True), loss_scale_for_sp(2, 1, True), loss_scale_for_sp(4, 2, False),
            loss_scale_for_sp(2, 3, True)] == [1.0, 0.5, 0.25, 1.0]
    with pytest.raises(ValueError, match="reduce_scatter") as e:
        loss_scale_for_sp(2, 3, False)
    assert "\n" not in str(e.value)
    assert sp_size({}) == 1 and sp_size({"sequence_parallel_size": 2}) == 2


# ------------------------------------------------------------------ through the worker (run directories)
#: plan-level: the worker (runtime/worker.py cp_view, mesh coordinates) on run dirs the planner wrote with
#: parallel: {dp_shard: 2, cp: 2, cp_mode: ulysses}; DeepSpeed reads sequence_parallel_size from the emitted
#: ds_config.json. Accumulation differs (1-D: micro 1 × 2 × dp 4; cp 2: micro 1 × 4 × dp 2), the global
#: batch of 8 sequences is the same. Eval at the last step runs each rank's whole sequences (ALST's
#: disable_in_eval): its loss must match too.
WORKER_STEPS = 3


def _worker_sc(name, strategy, cp, **train):
    over = {"hardware": {"gpus_per_node": WORLD}, "run": {"eval_every": WORKER_STEPS},
            "train": {"strategy": strategy, "precision": "fp32", "steps": WORKER_STEPS, "micro_batch": 1,
                      "global_batch": 8, **train}}
    if cp > 1:
        over["parallel"] = {"dp_shard": WORLD // cp, "cp": cp, "cp_mode": "ulysses"}
    return {"name": name, "over": over}


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    from conftest import run_driver
    base = tmp_path_factory.mktemp("ds_sp_worker")
    sc = [_worker_sc("zero2_sp2", "zero2", 2), _worker_sc("zero3_sp2", "zero3", 2, grad_ckpt="full", loss="chunked"),
          _worker_sc("zero2_1d", "zero2", 1)]
    # a stop after step 2 (simulated SIGUSR2, as test_checkpoint_resume.py), the same run dir again, and the
    # uninterrupted run: resume on the sp mesh
    resume = _worker_sc("resume", "zero2", 2)["over"]
    sc += [{"name": "pre_resume", "run_dir": str(base / "resume_sp2"), "over": resume,
            "env": {"SHARDTRAIN_TEST_SIGNAL_AT_STEP": "2:USR2"}},
           {"name": "post_resume", "run_dir": str(base / "resume_sp2")},
           {"name": "ref_resume", "over": resume}]
    return run_driver(base, sc, nproc=WORLD)


def _eval_reference(run_dir) -> float:
    """The eval loss of the run's final model on the held-out batches of all its dp ranks, one process,
    full sequences, plain sdpa (what worker.evaluate must report after the last step)."""
    from safetensors.torch import load_file
    from shardtrain.runtime.build import read_run_dir
    from shardtrain.runtime.data import build_datasets, eval_indices, load_tokenizer
    from shardtrain.runtime.loss import ce_sum
    from shardtrain.runtime.modeling import build_base, model_source
    cfg, plan = read_run_dir(run_dir)
    src = model_source(plan.runtime.model)
    tok = load_tokenizer(cfg.model.tokenizer, src.model_dir)
    _, ev = build_datasets(tok, train_path=plan.runtime.data_train, eval_path=plan.runtime.data_eval,
                           eval_fraction=cfg.data.eval_fraction, fmt=cfg.data.format, packing=cfg.data.packing,
                           seq_len=plan.train.seq_len)
    model = build_base(src, torch.float32, seed=cfg.train.seed, attention="sdpa", meta=False)
    model.load_state_dict(load_file(str(Path(run_dir) / "final" / "model.safetensors")), strict=False)
    model.eval()
    dp, m = plan.parallel.dp, plan.chosen.micro_batch_size
    tot = n = 0.0
    with torch.no_grad():
        for rank in range(dp):
            for ix in eval_indices(len(ev), cfg.run.eval_batches, m, dp, rank):
                b = ev.collate(ix)
                labels = b.pop("labels")
                tot += float(ce_sum(model(**b).logits, labels))
                n += float((labels[:, 1:] != -100).sum())
    return tot / n


def test_eval_reference_reads_the_1d_run(worker_runs):
    """The in-process eval reference reproduces the 1-D run's own eval loss (so it is a fair yardstick)."""
    ref = Path(worker_runs["zero2_1d"]["run_dir"])
    (ev,) = _metrics(ref, "eval")
    assert ev["eval_loss"] == pytest.approx(_eval_reference(ref), rel=LOSS_RTOL)


def _metrics(run_dir, kind):
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == kind]


@pytest.mark.parametrize("name", ["zero2_sp2", "zero3_sp2"])
def test_worker_deepspeed_sp2_equals_1d(worker_runs, name):
    from safetensors.torch import load_file
    run, ref = Path(worker_runs[name]["run_dir"]), Path(worker_runs["zero2_1d"]["run_dir"])
    plan = json.loads((run / "plan.json").read_text())
    assert (plan["parallel"]["dp_shard"], plan["parallel"]["cp"]) == (2, 2)
    assert json.loads((run / "ds_config.json").read_text())["sequence_parallel_size"] == 2
    got, want = _metrics(run, "train"), _metrics(ref, "train")
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=LOSS_RTOL)
    # eval is sliced per cp rank as in training; its held-out batches depend on dp (eval_indices), so it is
    # checked against the final model evaluated in this process on the same batches
    (ev,) = _metrics(run, "eval")
    assert ev["eval_loss"] == pytest.approx(_eval_reference(run), rel=LOSS_RTOL)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want], "tokens counted once per sequence"
    sd, ref_sd = load_file(str(run / "final" / "model.safetensors")), load_file(str(ref / "final" / "model.safetensors"))
    worst = max((sd[k].float() - ref_sd[k].float()).abs().max().item() for k in ref_sd)
    print(f"\nworker {name} vs zero2 1-D: max |param diff| {worst:.3g}")
    assert worst < PARAM_ATOL


def test_worker_deepspeed_sp2_resume_is_bitwise(worker_runs):
    """Stopped after step 2 and resumed on the same sp mesh: the losses and final parameters are the
    uninterrupted run's, bit for bit."""
    from safetensors.torch import load_file
    pre, post, ref = (worker_runs[k] for k in ("pre_resume", "post_resume", "ref_resume"))
    assert pre["preempted"] and len(pre["losses"]) == 2 and post["start_step"] == 2
    assert pre["losses"] + post["losses"] == ref["losses"]
    a = load_file(str(Path(post["run_dir"]) / "final" / "model.safetensors"))
    b = load_file(str(Path(ref["run_dir"]) / "final" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
