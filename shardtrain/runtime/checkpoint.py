"""Checkpoints (resume) and the final Hugging Face export.

checkpoints/step_N/   N optimizer steps done, written crash-safely (see :mod:`ckpt_files`: engines write
                      into .tmp_step_N/, rank 0 writes MANIFEST.json, fsyncs, renames to step_N/, then
                      COMPLETE and the `latest` pointer last).
                      `state/`: the PORTABLE model + optimizer state (runtime/portable.py: one
                      torch.distributed.checkpoint layout keyed by parameter name, fp32 masters and
                      optimizer states) that every engine writes and reads on any number of ranks, so a
                      run resumes on another world size or strategy (DDP <-> FSDP2 <-> ZeRO-1/2/3).
                      Every rank: `rng_rank{R}.pt` (Python, NumPy, torch CPU [+CUDA] generators);
                      `scaler.pt` (fp16 GradScaler, DDP/FSDP2). Rank 0: `trainer_state.json` (step,
                      samples_seen = the data position in GLOBAL samples, global batch, world size,
                      strategy). Resume takes the newest checkpoint that verifies; the last
                      `run.keep_checkpoints` are kept. Loads use torch.load(weights_only=True).
                      Checkpoints written before the portable layout (DDP model.pt/optimizer.pt, FSDP2
                      dcp/, DeepSpeed's own tag folders) still load on the engine and world size that
                      wrote them.
final/                `save_pretrained` model (or peft adapter) + tokenizer, loadable with
                      from_pretrained / PeftModel.from_pretrained.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from shardtrain.compiler.specs import Engine
from shardtrain.rundir_format import CKPT_STATE_DIR
from shardtrain.runtime import ckpt_files as files
from shardtrain.runtime import portable
from shardtrain.runtime.ckpt_files import CheckpointSpaceError
from shardtrain.runtime.dist import barrier
from shardtrain.runtime.faults import maybe_kill

log = logging.getLogger("shardtrain.checkpoint")
_WARNED: list = []  # the block-wise-state warning is given once per process
KEEP_LAST = 3
#: Free space kept on top of the estimate (metadata, the manifest, file-system slack).
SPACE_MARGIN = 1.10


def step_dir(run_dir: Path, step: int) -> Path:
    return files.checkpoint_dir(run_dir, step)


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    """COLLECTIVE (with a process group): the newest checkpoint that verifies (COMPLETE, manifest sizes and
    digests, trainer_state.json), the same on every rank; newer broken ones are skipped with one warning
    line (rank 0 only). See runtime/ckpt_digest.py."""
    from shardtrain.runtime.ckpt_digest import latest_verified
    return latest_verified(run_dir)


def _is_partial(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _rng_state() -> dict:
    """Every generator the run draws from, as tensors/ints/strs so weights_only loading accepts it."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in s:
        n = s["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _load(path: Path, device=None):
    return torch.load(path, map_location=device, weights_only=True)


def _local_state_bytes(eng) -> int:
    """Bytes this rank's share of model + optimizer state takes (what a save writes for it)."""
    seen, total = set(), 0
    tensors = list(eng.model.parameters()) + list(eng.model.buffers())
    opt = getattr(eng, "optimizer", None)
    for st in (getattr(opt, "state", {}) or {}).values() if opt is not None else []:
        tensors += [v for v in (st.values() if isinstance(st, dict) else []) if torch.is_tensor(v)]
    for t in tensors:
        t = getattr(t, "_local_tensor", t)  # FSDP2 DTensor: this rank's shard
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _space_preflight(eng, root: Path, keep: int) -> None:
    """COLLECTIVE, before anything is written: is there room for one more checkpoint? The size of the
    previous checkpoint when there is one (exact), else this rank's state bytes summed over ranks
    (DeepSpeed keeps fp32 master copies and optimizer states: counted through its optimizer too)."""
    prev = files.complete_steps(root)
    if prev:
        need = files.dir_bytes(prev[-1][1])
    else:
        est = torch.tensor([_local_state_bytes(eng)], dtype=torch.float64)
        if eng.kind is not Engine.DDP:  # sharded: every rank writes its share
            dist.all_reduce(est)
        need = int(est.item() * (3 if eng.kind is Engine.DEEPSPEED else 1))  # DS: master + 2 states
    need = int(need * SPACE_MARGIN)
    free = files.free_bytes(root)
    short = torch.tensor([1 if free < need else 0], dtype=torch.int32)
    dist.all_reduce(short, op=dist.ReduceOp.MAX)
    if short.item():
        from shardtrain.units import fmt_bytes
        raise CheckpointSpaceError(
            f"checkpoint dir {root}: {fmt_bytes(free)} free, the next checkpoint needs about {fmt_bytes(need)}; "
            f"free space there, lower run.keep_checkpoints (is {keep}), or move run.output_dir")


def save_checkpoint(eng, run_dir: Path, step: int, trainer_state: dict, keep: int = KEEP_LAST) -> Path:
    """COLLECTIVE. Write checkpoints/step_{step} crash-safely; keep the newest ``keep``."""
    final = step_dir(run_dir, step)
    root = final.parent
    tmp = root / f"{files.TMP_PREFIX}{final.name}"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        files.sweep_temporaries(root)
    barrier()
    _space_preflight(eng, root, keep)
    if rank == 0:
        tmp.mkdir(parents=True)
    barrier()
    from shardtrain.runtime.ckpt_digest import Recorder
    rec = Recorder(tmp)  # every file is hashed as it is written: its digest goes into MANIFEST.json
    if not (odd := portable.blockwise_states(eng)):
        portable.save(eng, tmp / CKPT_STATE_DIR, writer=rec.dcp_writer(tmp / CKPT_STATE_DIR))
    else:  # e.g. 8-bit AdamW under ZeRO: DeepSpeed's own layout, loadable on this strategy and world size only
        if rank == 0 and not _WARNED:
            _WARNED.append(step)
            log.warning("optimizer states %s are block-wise: checkpoint %s keeps DeepSpeed's layout (resumes "
                        "only with %s on %d ranks)", odd, final.name, trainer_state.get("strategy"),
                        dist.get_world_size())
        # save_latest=False: DeepSpeed's own `latest` would name the temporary tag. Its files are not
        # written through the recorder: rank 0 hashes them when sealing (ckpt_hash.manifest_for).
        eng.ds.save_checkpoint(str(root), tag=tmp.name, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=_is_partial(eng.model))
    if eng.scaler is not None and rank == 0:
        rec.torch_save(eng.scaler.state_dict(), tmp / "scaler.pt")
    rec.torch_save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    maybe_kill("save", rank, step)  # TEST-ONLY (runtime/faults.py): a crash in the middle of a save
    if rank == 0:
        rec.write_text(tmp / files.TRAINER_STATE, json.dumps(trainer_state, indent=1))
    rec.dump(rank)
    barrier()
    if rank == 0:
        files.seal(tmp, final)
        files.prune(root, max(1, keep))
    barrier()
    return final


def load_checkpoint(eng, d: Path) -> dict:
    """COLLECTIVE: load step_N into the engine (any engine, any world size for the portable layout);
    returns trainer_state.json. The RNG state of rank R is restored when the checkpoint has one for R
    (a rank that did not exist when it was written keeps its seeded generators)."""
    d = Path(d)
    rank = dist.get_rank()
    state = json.loads((d / files.TRAINER_STATE).read_text())
    if (d / CKPT_STATE_DIR).is_dir():
        portable.load(eng, d / CKPT_STATE_DIR)
        if eng.kind is Engine.DEEPSPEED:
            eng.ds.global_steps = int(state.get("step", 0))
    else:
        _load_legacy(eng, d, state)
    if eng.scaler is not None and (d / "scaler.pt").is_file():
        eng.scaler.load_state_dict(_load(d / "scaler.pt"))
    rng = d / f"rng_rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(_load(rng))
    return state


def _load_legacy(eng, d: Path, state: dict) -> None:
    """A checkpoint in an engine's own layout (written before portable checkpoints, or by DeepSpeed for
    block-wise optimizer states): only the engine and world size that wrote it read it."""
    wrote = (state.get("strategy"), state.get("world_size"))
    kind = {"model.pt": Engine.DDP, "dcp": Engine.FSDP}
    old_engine = next((k for f, k in kind.items() if (d / f).exists()), Engine.DEEPSPEED)
    if old_engine is not eng.kind or (wrote[1] is not None and wrote[1] != dist.get_world_size()):
        raise RuntimeError(f"checkpoint {d} is in {old_engine.value}'s own layout (not portable: written by "
                           f"{wrote[0]} on {wrote[1]} ranks): it loads only there; resume with that strategy and "
                           "world size, or start fresh with --no-resume")
    if eng.kind is Engine.DDP:
        sd = _load(d / "model.pt", eng.device)
        missing, unexpected = eng.model.load_state_dict(sd, strict=not _is_partial(eng.model))
        if unexpected:
            raise RuntimeError(f"{d}: unexpected keys in model.pt: {unexpected[:5]}")
        eng.optimizer.load_state_dict(_load(d / "optimizer.pt", eng.device))
    elif eng.kind is Engine.FSDP:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
        partial = _is_partial(eng.model)
        opts = StateDictOptions(ignore_frozen_params=partial, strict=not partial)
        msd, osd = get_state_dict(eng.model, eng.optimizer, options=opts)
        st = {"model": msd, "optim": osd}
        dcp.load(st, checkpoint_id=str(d / "dcp"))
        set_state_dict(eng.model, eng.optimizer, model_state_dict=st["model"], optim_state_dict=st["optim"],
                       options=opts)
    else:
        path, _ = eng.ds.load_checkpoint(str(d.parent), tag=d.name, load_module_strict=not _is_partial(eng.model))
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {d}")


def full_state_dict(eng) -> dict | None:
    """COLLECTIVE: the full (unsharded) model state dict on rank 0 (None elsewhere), on the host."""
    if eng.kind is Engine.FSDP:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(eng.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if dist.get_rank() == 0 else None
    if eng.kind is Engine.DEEPSPEED and getattr(eng, "tp", 1) > 1:  # AutoTP: gathered over tp (runtime/ds_autotp.py)
        from shardtrain.runtime.ds_autotp import full_state_dict as autotp_full_state_dict
        return autotp_full_state_dict(eng)
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
