"""DeepSpeed AutoTP training scenarios in ONE torchrun launch (issue 18), driving the real
runtime/engines.py DeepSpeedEngine (AutoTP from the config's tensor_parallel.autotp_size, groups checked
against the mesh by runtime/ds_autotp.py) with the worker's loss normalisation, on a tiny Llama:

    torchrun --standalone --nproc_per_node 4 tests/runtime/autotp_driver.py SPEC.json

SPEC: {"out": DIR, "steps": N, "seq": S, "global_batch": G, "scenarios": [{"name", "zero": 1|2, "tp": 1|2,
"optimizer": "adamw" | "sgd", "lr": float, "clip": float}]}. Ranks are (dp, tp) with tp innermost (the mesh
order): dp rank = rank // tp takes G/dp sequences per step, its tp peers the SAME ones. The loop is
worker.train_step's: the summed token loss scaled by grad_reduce (= dp) × engine.loss_multiplier / labelled
tokens of the global batch; the step's loss sum counts one rank per tp group (MeshCoords.counts_loss).
Rank 0 writes DIR/NAME.pt: per-step mean token loss, grad norms, every final fp32 parameter (full, gathered
over tp: runtime/ds_autotp.full_fp32_params) and a probe of how the parameters are split.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cp_driver import LR, build_model, sequences  # noqa: E402  (same data and model as the cp scenarios)
from cp_driver import main as cp_main  # noqa: E402  (the scenario loop)


def make_engine(sc: dict, model, dp: int, local_batch: int):
    from shardtrain.compiler.specs import Precision
    from shardtrain.runtime import engines as E
    clip, tp = sc.get("clip", 1.0), sc["tp"]
    if sc.get("optimizer") == "sgd":
        opt = torch.optim.SGD(E.trainable(model), lr=sc.get("lr", LR))
    else:
        opt = torch.optim.AdamW(E.trainable(model), lr=sc.get("lr", LR), weight_decay=0.0)
    # batch arithmetic as emit/deepspeed_sizes.batch_world: micro × accum × dp × tp
    ds_config = {"train_micro_batch_size_per_gpu": local_batch, "gradient_accumulation_steps": 1,
                 "train_batch_size": local_batch * dp * tp, "gradient_clipping": clip,
                 "zero_optimization": {"stage": sc["zero"]}, "zero_allow_untested_optimizer": True}
    if tp > 1:
        ds_config["tensor_parallel"] = {"autotp_size": tp}
    return E.DeepSpeedEngine(model, opt, ds_config=ds_config, grad_accum=1, zero_stage=sc["zero"],
                             offload_optimizer=False, offload_params=False, precision=Precision.FP32,
                             grad_clip=clip, device=torch.device("cpu"))


def run_scenario(sc: dict, spec: dict) -> dict:
    from shardtrain.runtime.context_parallel import shifted_ce_sum
    from shardtrain.runtime.ds_autotp import full_fp32_params, split_probe
    rank, world = dist.get_rank(), dist.get_world_size()
    tp = sc["tp"]
    dp = world // tp
    G, seq = spec["global_batch"], spec["seq"]
    local = G // dp
    model = build_model()
    model.train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    eng = make_engine(sc, model, dp, local)
    losses, norms = [], []
    try:
        probe = split_probe(eng.model)
        for step in range(spec["steps"]):
            ids, labels = sequences(step, G, seq, model.config.vocab_size)
            n_label = int((labels[:, 1:] != -100).sum())
            mine = slice((rank // tp) * local, (rank // tp + 1) * local)
            scale = dp * eng.loss_multiplier / n_label       # worker.train_step: grad_reduce = dp × cp
            with eng.micro_step(True):
                logits = eng.forward({"input_ids": ids[mine]})
                loss = shifted_ce_sum(logits[:, :-1], labels[mine][:, 1:])
                eng.backward(loss * scale, True)
            norms.append(eng.step(sc.get("lr", LR)))
            total = (loss.detach() if rank % tp == 0 else torch.zeros(())).reshape(1).clone()
            dist.all_reduce(total)
            losses.append(total.item() / n_label)
        params = full_fp32_params(eng)
    finally:
        eng.close()
    moved = max((params[n] - initial[n]).abs().max().item() for n in initial)
    return {"losses": losses, "grad_norms": norms, "params": params, "moved": moved, "probe": probe}


if __name__ == "__main__":
    sys.exit(cp_main(run_scenario, "autotp_driver"))
