"""The HF side of benchmarks/runtime_vs_accelerate.py: the same job through `accelerate launch` + Trainer.

Run by the benchmark as (one per strategy):
    accelerate launch --multi_gpu --num_processes 2 benchmarks/hf_trainer_side.py --run-dir DIR --out F
    accelerate launch --use_deepspeed --zero_stage 2 --num_processes 2 benchmarks/hf_trainer_side.py ...

DIR is a run dir prepared by shardtrain (run.yaml, plan.json): the model (configs/models preset,
random init, same seed), the data (the bundled corpus and tokenizer, packed into seq_len blocks by
shardtrain.runtime.data), micro batch, accumulation, steps, lr schedule, clipping and precision all
come from it, so both sides train the same job. ZeRO-2 uses the emitter's Trainer-style DeepSpeed
config (``deepspeed_config(plan, trainer=True)``: "auto" optimizer values filled by the Trainer).

Rank 0 writes F: per-step wall times (between consecutive optimizer steps, measured by a callback),
the tokens per step and the losses.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


class _Packed(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return i


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile-out", help="profile rank 0's steps $SHARDTRAIN_PROFILE_AT.. (benchmarks/profile_step.py)")
    args = ap.parse_args()

    import yaml
    from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainerCallback, TrainingArguments

    from shardtrain.compiler.plan import Plan
    from shardtrain.config.presets import load_model_config
    from shardtrain.config.schema import parse_run_config
    from shardtrain.emit.deepspeed import deepspeed_config, trainer_arguments
    from shardtrain.runtime.data import build_datasets, load_tokenizer

    run_dir = Path(args.run_dir)
    cfg = parse_run_config(yaml.safe_load((run_dir / "run.yaml").read_text()))
    plan = Plan.from_json(json.loads((run_dir / "plan.json").read_text()))
    c, t = plan.chosen, cfg.train

    tok = load_tokenizer(None, None)
    train, _ = build_datasets(tok, train_path=cfg.data.train, eval_path=None, eval_fraction=cfg.data.eval_fraction,
                              fmt=cfg.data.format, packing=cfg.data.packing, seq_len=t.seq_len)
    raw, _ = load_model_config(cfg.model.name)
    hf_cfg = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, attn_implementation="sdpa")

    kw = trainer_arguments(plan, lr=t.lr, weight_decay=t.weight_decay, grad_clip=t.grad_clip)
    ds_path = None
    if c.strategy.engine.value == "deepspeed":
        ds_path = str(Path(args.out).with_suffix(f".ds_config.rank{os.environ.get('RANK', '0')}.json"))
        Path(ds_path).write_text(json.dumps(deepspeed_config(plan, trainer=True)))
    targs = TrainingArguments(
        output_dir=str(Path(args.out).parent / "hf_out"), max_steps=t.steps, warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": t.min_lr_ratio},
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0,
        seed=t.seed, use_cpu=not torch.cuda.is_available(), ddp_backend=None if torch.cuda.is_available() else "gloo",
        deepspeed=ds_path, disable_tqdm=True,
        # the strongest baseline: no extra autograd traversal (the Trainer's DDP default looks for unused params)
        ddp_find_unused_parameters=False, **kw)

    times: list[float] = []
    window = None
    if args.profile_out:
        from _profiling import StepWindow
        window = StepWindow(args.profile_out, rank=int(os.environ.get("RANK", "0")))
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **k):
            times.append(time.perf_counter())

        def on_step_begin(self, a, state, control, **k):
            if window:
                window.begin(state.global_step)

        def on_step_end(self, a, state, control, **k):
            times.append(time.perf_counter())
            if window:
                window.end(state.global_step - 1)

        def on_log(self, a, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = Trainer(model=model, args=targs, train_dataset=_Packed(train),
                      data_collator=lambda idx: train.collate(list(idx)), callbacks=[Clock()])
    trainer.train()
    if trainer.is_world_process_zero():
        Path(args.out).write_text(json.dumps({
            "step_times_s": [b - a for a, b in zip(times, times[1:])],
            "tokens_per_step": c.micro_batch_size * c.grad_accum_steps * c.world_size * t.seq_len,
            "losses": losses, "world_size": trainer.args.world_size,
            "distributed": str(trainer.accelerator.distributed_type)}))


if __name__ == "__main__":
    main()
