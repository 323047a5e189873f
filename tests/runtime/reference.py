"""Single-process reference training (no engine, no process group): the same model init, global
batches, loss normalisation, AdamW, schedule and clipping the worker uses, as a plain loop."""
from __future__ import annotations

import torch

from shardtrain.runtime.build import read_run_dir
from shardtrain.runtime.data import StepSampler, build_datasets, count_label_tokens, load_tokenizer
from shardtrain.runtime.modeling import build_base, model_source
from shardtrain.runtime.optim import build_optimizer, lr_at
from shardtrain.runtime.loss import ce_sum


def reference_run(run_dir) -> tuple[list[float], dict]:
    cfg, plan = read_run_dir(run_dir)
    c = plan.chosen
    src = model_source(plan.runtime.model)
    tok = load_tokenizer(cfg.model.tokenizer, src.model_dir)
    train, _ = build_datasets(tok, train_path=plan.runtime.data_train, eval_path=plan.runtime.data_eval,
                              eval_fraction=cfg.data.eval_fraction, fmt=cfg.data.format,
                              packing=cfg.data.packing, seq_len=plan.train.seq_len)
    sampler = StepSampler(len(train), cfg.train.seed, micro_batch=c.micro_batch_size,
                          grad_accum=c.grad_accum_steps * c.world_size, world_size=1, rank=0)
    model = build_base(src, torch.float32, seed=cfg.train.seed, attention="sdpa", meta=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(c.optimizer, params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    losses = []
    for s in range(cfg.train.steps):
        batches = [train.collate(ix) for ix in sampler.step_indices(s)]
        n = sum(count_label_tokens(b) for b in batches)
        total = 0.0
        for b in batches:
            labels = b.pop("labels")
            loss = ce_sum(model(**b).logits, labels)
            (loss / n).backward()
            total += float(loss.detach())
        lr = lr_at(s, lr=cfg.train.lr, warmup=cfg.train.warmup_steps, total=cfg.train.steps,
                   min_ratio=cfg.train.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / n)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
