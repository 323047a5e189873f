"""Issue 21 (3): the OOM re-plan may switch strategy now that checkpoints load across strategies
(runtime/portable.py). The ladder's last rung moves along oom.SHARDING_LADDER to the next strategy whose
plan fits and predicts less memory per GPU, everything else pinned (pure: the real planner, no process)."""
from __future__ import annotations

from pathlib import Path

from shardtrain.config.pipeline import compile as compile_config
from shardtrain.launcher import oom

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "examples" / "tiny-cpu.yaml"
END_OF_LADDER = {"train.micro_batch": 1, "train.grad_ckpt": "full", "train.loss": "chunked",
                 "train.activation_offload": "cpu"}
REC = [{"rank": 0, "phase": "backward", "step": 2}]


def test_at_the_end_of_the_ladder_the_strategy_shards_more():
    cfg, p = compile_config(TINY, {**END_OF_LADDER, "train.strategy": "ddp"})
    r = oom.next_plan(cfg, p, REC)
    assert r is not None and r.plan.strategy.value != "ddp", r and r.message
    order = oom.SHARDING_LADDER
    assert order.index(r.plan.strategy.value) > order.index("ddp")
    c, n = p.chosen, r.plan.chosen
    assert n.fits and n.per_gpu.total < c.per_gpu.total
    # only the strategy changed: the batch split, checkpointing, loss and offload are kept
    assert (n.micro_batch_size, n.grad_accum_steps, r.plan.train.global_batch_size) == \
        (c.micro_batch_size, c.grad_accum_steps, p.train.global_batch_size)
    assert (n.gradient_checkpointing, n.loss, n.activation_offload) == \
        (c.gradient_checkpointing, c.loss, c.activation_offload)
    assert f"strategy ddp → {r.plan.strategy.value}" in r.message and "portable" in r.message


def test_the_ladder_ends_with_the_most_sharded_strategy():
    cfg, p = compile_config(TINY, {**END_OF_LADDER, "train.strategy": oom.SHARDING_LADDER[-1]})
    assert oom.next_plan(cfg, p, REC) is None


def test_the_switched_plan_passes_the_resume_check(tmp_path):
    """The re-planned run dir is accepted by the run-dir check (a strategy change is an execution change)."""
    from shardtrain.launcher.rundir import write_run_dir
    cfg, p = compile_config(TINY, {**END_OF_LADDER, "train.strategy": "ddp"})
    d = write_run_dir(tmp_path / "r", cfg, p).run_dir
    (d / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 6.0}\n')
    r = oom.next_plan(cfg, p, REC)
    prepared = write_run_dir(d, r.cfg, r.plan)
    assert prepared.has_state and any(f"strategy ddp → {r.plan.strategy.value}" in n for n in prepared.notes)
