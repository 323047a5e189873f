"""Checkpoints (resume) and the final Hugging Face export.

checkpoints/step_N/   N optimizer steps done. DDP: rank 0 `model.pt` + `optimizer.pt` (LoRA: only
                      the trainable tensors); FSDP2: torch.distributed.checkpoint under `dcp/`
                      (resharding on load); DeepSpeed: `engine.save_checkpoint(checkpoints, tag=step_N)`.
                      Every rank: `rng_rank{R}.pt`. Rank 0, after a barrier: `trainer_state.json` and
                      `COMPLETE` — resume only considers complete checkpoints.
final/                `save_pretrained` model (or peft adapter) + tokenizer, loadable with
                      from_pretrained / PeftModel.from_pretrained.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from shardtrain.compiler.specs import Engine
from shardtrain.runtime.dist import barrier

COMPLETE = "COMPLETE"
KEEP_LAST = 3


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    root = Path(run_dir) / "checkpoints"
    found = []
    for d in root.glob("step_*") if root.is_dir() else []:
        try:
            n = int(d.name.split("_", 1)[1])
        except ValueError:
            continue
        if (d / COMPLETE).is_file():
            found.append((n, d))
    return max(found) if found else None


def _is_partial(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _trainable_state(model) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def save_checkpoint(eng, run_dir: Path, step: int, trainer_state: dict) -> Path:
    d = step_dir(run_dir, step)
    rank = dist.get_rank()
    if rank == 0:
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    barrier()
    partial = _is_partial(eng.model)
    if eng.kind is Engine.DDP:
        if rank == 0:
            model_sd = _trainable_state(eng.model) if partial else eng.model.state_dict()
            torch.save(model_sd, d / "model.pt")
            torch.save(eng.optimizer.state_dict(), d / "optimizer.pt")
            if eng.scaler is not None:
                torch.save(eng.scaler.state_dict(), d / "scaler.pt")
    elif eng.kind is Engine.FSDP:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        msd, osd = get_state_dict(eng.model, eng.optimizer, options=StateDictOptions(ignore_frozen_params=partial))
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(d / "dcp"))
    else:
        eng.ds.save_checkpoint(str(d.parent), tag=d.name, client_state={"step": step},
                               exclude_frozen_parameters=partial)
    torch.save(_rng_state(), d / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        (d / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
        (d / COMPLETE).write_text("")
        old = sorted((int(p.name.split("_")[1]), p) for p in d.parent.glob("step_*") if (p / COMPLETE).is_file())
        for _, p in old[:-KEEP_LAST]:
            shutil.rmtree(p, ignore_errors=True)
    barrier()
    return d


def load_checkpoint(eng, d: Path) -> dict:
    d = Path(d)
    rank = dist.get_rank()
    if eng.kind is Engine.DDP:
        sd = torch.load(d / "model.pt", map_location=eng.device, weights_only=False)
        missing, unexpected = eng.model.load_state_dict(sd, strict=not _is_partial(eng.model))
        if unexpected:
            raise RuntimeError(f"{d}: unexpected keys in model.pt: {unexpected[:5]}")
        eng.optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location=eng.device, weights_only=False))
        if eng.scaler is not None and (d / "scaler.pt").is_file():
            eng.scaler.load_state_dict(torch.load(d / "scaler.pt", weights_only=False))
    elif eng.kind is Engine.FSDP:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
        opts = StateDictOptions(ignore_frozen_params=_is_partial(eng.model))
        msd, osd = get_state_dict(eng.model, eng.optimizer, options=opts)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(d / "dcp"))
        set_state_dict(eng.model, eng.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=opts)
    else:
        path, _ = eng.ds.load_checkpoint(str(d.parent), tag=d.name, load_module_strict=not _is_partial(eng.model))
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {d}")
    rng = d / f"rng_rank{rank}.pt"
    if rng.is_file():
        s = torch.load(rng, weights_only=False)
        torch.set_rng_state(s["torch"])
        random.setstate(s["python"])
        if "cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["cuda"])
    return json.loads((d / "trainer_state.json").read_text())


def full_state_dict(eng) -> dict | None:
    """COLLECTIVE: the full (unsharded) model state dict on rank 0 (None elsewhere), on the host."""
    if eng.kind is Engine.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(eng.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if dist.get_rank() == 0 else None
    if eng.kind is Engine.DEEPSPEED and eng.zero_stage == 3:
        sd = eng.ds._zero3_consolidated_16bit_state_dict()
        return {k: v.cpu() for k, v in sd.items()} if dist.get_rank() == 0 else None
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in eng.model.state_dict().items()}


def save_final(eng, out: Path, tokenizer) -> Path:
    """The trained model (or LoRA adapter) in Hugging Face format, plus the tokenizer."""
    out = Path(out)
    sd = full_state_dict(eng)
    if dist.get_rank() == 0:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        eng.model.save_pretrained(str(out), state_dict=sd)
        tokenizer.save_pretrained(str(out))
    barrier()
    return out
