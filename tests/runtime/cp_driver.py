"""Context-parallel training scenarios in ONE torchrun launch (issue 18), driving the real engines
(runtime/engines.py DeepSpeedEngine with DeepSpeed's ALST; FSDP2 `fully_shard` with install_ulysses) with
the worker's loss normalisation, on a tiny Llama and fixed token data:

    torchrun --standalone --nproc_per_node 4 tests/runtime/cp_driver.py SPEC.json

SPEC: {"out": DIR, "steps": N, "seq": S, "global_batch": G, "scenarios": [{"name", "engine": "deepspeed" |
"fsdp2", "cp": 1|2, "zero": 2|3,
"optimizer": "adamw" | "sgd", "lr": float, "clip": float (0: none)}]}. Ranks are (dp, cp) with cp innermost (the mesh order); each dp rank
takes G/dp sequences per step, each cp rank its cp_slice of them. The loop is worker.train_step's: the
summed token loss scaled by (dp × cp) × engine.loss_multiplier / (labelled tokens of the global batch).
Rank 0 writes DIR/NAME.pt (torch.save): per-step mean token loss, grad norms, every final fp32 parameter
and the largest parameter change.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

TINY = Path(__file__).resolve().parents[2] / "configs" / "models" / "tiny-llama.json"
LR = 1e-3


def sequences(step: int, n: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step`: n sequences, each with a few unlearned prompt tokens and right padding."""
    ids, labels = [], []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 * step + i)
        x = torch.randint(3, vocab, (seq,), generator=g)
        y = x.clone()
        y[: 1 + i % 3] = -100                    # a prompt
        if i % 2:
            y[seq - 1 - i % 5:] = -100           # padding at the end
        ids.append(x)
        labels.append(y)
    return torch.stack(ids), torch.stack(labels)


def build_model():
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(TINY)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float()


def make_engine(sc: dict, model, world: int, local_batch: int):
    from shardtrain.compiler.specs import Precision
    from shardtrain.runtime import engines as E
    clip = sc.get("clip", 1.0)
    common = dict(precision=Precision.FP32, grad_clip=clip, device=torch.device("cpu"))
    cp = sc["cp"]

    def optimizer():
        if sc.get("optimizer") == "sgd":  # scale-sensitive: a gradient off by a factor shows in the params
            return torch.optim.SGD(E.trainable(model), lr=sc.get("lr", LR))
        return torch.optim.AdamW(E.trainable(model), lr=sc.get("lr", LR), weight_decay=0.0)
    if sc["engine"] == "deepspeed":
        ds_config = {"train_micro_batch_size_per_gpu": local_batch, "gradient_accumulation_steps": 1,
                     "train_batch_size": local_batch * world // cp, "gradient_clipping": clip,
                     "zero_optimization": {"stage": sc["zero"]}, "zero_allow_untested_optimizer": True}
        if cp > 1:
            ds_config["sequence_parallel_size"] = cp
        return E.DeepSpeedEngine(model, optimizer(), ds_config=ds_config, grad_accum=1, zero_stage=sc["zero"],
                                 offload_optimizer=False, offload_params=False, **common)
    # FSDP2 over the (dp_shard × cp) ranks, cp peers sharing the state (accelerate/torchtitan dp_shard_cp)
    from torch.distributed.fsdp import fully_shard
    from shardtrain.runtime.context_parallel import install_ulysses
    rank = dist.get_rank()
    if cp > 1:
        groups = [dist.new_group(list(range(d * cp, d * cp + cp))) for d in range(world // cp)]
        install_ulysses(model, groups[rank // cp])
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    eng = E.BaseEngine(model, optimizer(), **common)
    return eng


def full_params(eng) -> dict[str, torch.Tensor]:
    """Every trainable parameter in full fp32 on every rank (DeepSpeed's fp32 masters; FSDP2's DTensors)."""
    out = {}
    if hasattr(eng, "ds"):
        from deepspeed.utils import safe_get_full_fp32_param
        for n, p in eng.model.named_parameters():
            out[n] = safe_get_full_fp32_param(p).detach().clone()
        return out
    for n, p in eng.model.named_parameters():
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def run_scenario(sc: dict, spec: dict) -> dict:
    from shardtrain.runtime.context_parallel import cp_slice, shifted_ce_sum
    rank, world = dist.get_rank(), dist.get_world_size()
    cp = sc["cp"]
    dp = world // cp
    G, seq = spec["global_batch"], spec["seq"]
    local = G // dp
    model = build_model()
    model.train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    eng = make_engine(sc, model, world, local)
    losses, norms = [], []
    try:
        for step in range(spec["steps"]):
            ids, labels = sequences(step, G, seq, model.config.vocab_size)
            n_label = int((labels[:, 1:] != -100).sum())
            mine = slice((rank // cp) * local, (rank // cp + 1) * local)
            sl = cp_slice(ids[mine], labels[mine], rank % cp, cp)
            scale = world * eng.loss_multiplier / n_label     # worker.train_step: grad_reduce = dp × cp = world
            with eng.micro_step(True):
                logits = eng.module(input_ids=sl["input_ids"], position_ids=sl["position_ids"]).logits
                loss = shifted_ce_sum(logits, sl["shift_labels"])
                eng.backward(loss * scale, True)
            norms.append(eng.step(sc.get("lr", LR)))
            total = loss.detach().reshape(1).clone()
            dist.all_reduce(total)
            losses.append(total.item() / n_label)
        params = full_params(eng)
    finally:
        eng.close()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    moved = max((params[n] - initial[n]).abs().max().item() for n in initial)
    return {"losses": losses, "grad_norms": norms, "params": params, "moved": moved,
            # the engine's close() left the process as it found it (a later scenario runs plain sdpa)
            "sdpa_restored": ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward}


def main(run=None, name: str = "cp_driver") -> int:
    """Run every scenario of the spec file (argv[1]) in this process group with ``run(sc, spec)``
    (default: this module's run_scenario); rank 0 saves each result; the first error stops the launch."""
    run = run or run_scenario
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rc = 0
    for sc in spec["scenarios"]:
        try:
            res = run(sc, spec)
        except Exception as e:  # noqa: BLE001 - recorded, then the launch stops (the next collective would hang)
            res, rc = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}, 1
        print(f"[{name} rank{dist.get_rank()}] {sc['name']}: {res.get('error', 'ok')}", file=sys.stderr, flush=True)
        if dist.get_rank() == 0:
            torch.save(res, Path(spec["out"]) / f"{sc['name']}.pt")
        if rc:
            print(res["traceback"], file=sys.stderr, flush=True)
            break
    dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
