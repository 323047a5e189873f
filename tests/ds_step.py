"""deepspeed.initialize + one optimizer step on a tiny Llama, for emitted DeepSpeed configs.

Imported by tests/test_emit_deepspeed.py (world size 1, in-process) and run as a script under
torchrun (world size 2): `python tests/ds_step.py CASES.json` runs every case in one process group
and writes "<name> ok <loss>" lines (rank 0) to CASES.json + ".out".
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]


def tiny_model(frozen_embeddings: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = json.loads((ROOT / "configs/models/tiny-llama.json").read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    if frozen_embeddings:  # LoRA-like: part of the model is frozen
        model.model.embed_tokens.weight.requires_grad_(False)
    return model


def client_optimizer(name: str | None, params, lr: float):
    if name is None:
        return None
    if name == "bitsandbytes.optim.AdamW8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr)
    raise ValueError(name)


def one_step(cfg: dict, client: str | None = None, frozen_embeddings: bool = False) -> float:
    """Initialize an engine from `cfg` and run one full optimizer step (all micro-steps)."""
    import torch
    linear = torch.nn.functional.linear
    try:
        return _one_step(cfg, client, frozen_embeddings)
    finally:
        # ZeRO-3 replaces F.linear for the whole process (partition_parameters.py: "This will persist
        # unless manually reset"); in-process callers (tests/test_emit_deepspeed.py) must not leak it
        torch.nn.functional.linear = linear


def _one_step(cfg: dict, client: str | None, frozen_embeddings: bool) -> float:
    import deepspeed
    import torch
    from shardtrain.runtime.dist import _unlink_deepspeed_shm
    model = tiny_model(frozen_embeddings)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = client_optimizer(client, params, 1e-3)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=opt, config=cfg)
    _unlink_deepspeed_shm()   # the shm all-reduce's segment is created by the first initialize
    g = torch.Generator().manual_seed(1)
    mb, gas = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    losses = []
    for _ in range(gas):
        ids = torch.randint(0, 512, (mb, 16), generator=g).to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    assert engine.global_steps == 1, engine.global_steps
    assert all(torch.isfinite(torch.tensor(losses))), losses
    engine.destroy() if hasattr(engine, "destroy") else None
    return sum(losses) / len(losses)


def main(path: str) -> int:
    import deepspeed
    import torch.distributed as dist
    from shardtrain.runtime.dist import _unlink_deepspeed_shm
    deepspeed.init_distributed(dist_backend="gloo")
    _unlink_deepspeed_shm()
    cases = json.loads(Path(path).read_text())
    lines = []
    for case in cases:
        loss = one_step(case["config"], case.get("client"), case.get("frozen_embeddings", False))
        lines.append(f"{case['name']} ok {loss:.4f}")
        dist.barrier()
    if dist.get_rank() == 0:
        Path(path + ".out").write_text("\n".join(lines) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
