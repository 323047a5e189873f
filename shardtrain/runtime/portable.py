"""Portable checkpoints: ONE on-disk layout that DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 (offloaded or not) all
write and read, on any number of ranks (issue 21).

``checkpoints/step_N/state/`` is a torch.distributed.checkpoint (DCP) directory with flat keys::

    model.<fqn>                 fp32 master value of every parameter (full training: plus persistent buffers;
                                LoRA/QLoRA: only the trainable adapter tensors), global shape
    optim.state.<fqn>.<name>    the optimizer's per-parameter state in fp32, global shape
                                (AdamW: exp_avg, exp_avg_sq; ``step`` as a 0-d fp32 tensor)

``<fqn>`` is the parameter's name in the unwrapped Hugging Face / peft model, the same under every engine.
DCP's ``.metadata`` records each key's global shape and the chunks that hold it, so a rank reads exactly
the slices it needs: a checkpoint written by 2 ranks of FSDP2 loads into 1 rank of DDP or 4 of ZeRO-3.

How each engine gets there (the values are carried exactly, bit for bit):
- DDP and FSDP2: torch's ``get_model_state_dict`` / ``get_optimizer_state_dict`` with
  ``flatten_optimizer_state_dict=True`` (torch/distributed/checkpoint/state_dict.py: the
  ``state.<fqn>.<name>`` keys); FSDP2 values are DTensor shards, which DCP reshards on load.
- DeepSpeed: ``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` (collectives:
  every rank calls them in the same order) assemble each parameter's fp32 master and states; parameter i
  is written by rank i mod W, so no rank holds the whole model. Loading reads full tensors in chunks of
  :data:`LOAD_CHUNK_BYTES` and hands them to ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``
  (each rank keeps its partition), then refreshes the 16-bit / working copies from the fp32 masters.
  AutoTP (tensor_parallel.autotp_size, runtime/ds_autotp.py): those give a rank its tp slice; it is
  gathered over tp to the global shape on save (`to_full`) and cut back on load (`to_local`).
Optimizer hyper-parameters (lr, betas, weight decay) are NOT stored: they come from the run config, and the
LR from the schedule at each step (runtime/optim.py).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from shardtrain.compiler.specs import Engine
from shardtrain.rundir_format import CKPT_MODEL_PREFIX as MODEL, CKPT_OPTIM_PREFIX as OPTIM

STEP = "step"
#: fp32 bytes (parameters + their states) a DeepSpeed load reads per dcp.load call: bounds host memory.
LOAD_CHUNK_BYTES = 1 << 30


def _partial(model) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def checkpoint_keys(path: Path) -> set[str]:
    """The keys stored in a portable checkpoint (its DCP metadata)."""
    from torch.distributed.checkpoint import FileSystemReader
    return set(FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def _require(path: Path, have: set[str], want) -> None:
    missing = sorted(k for k in want if k not in have)
    if missing:
        raise RuntimeError(
            f"checkpoint {path} lacks {len(missing)} tensor(s) this run needs, e.g. {missing[0]!r}; it was written "
            "for another model, method or optimizer (resume with the run's own config, or start fresh with --no-resume)")


# ---------------------------------------------------------------- DDP and FSDP2 (torch state-dict API)
def _torch_options(model, loading: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    partial = _partial(model)
    # LoRA: only trainable tensors are stored; strict loading would demand the frozen base weights too
    return StateDictOptions(ignore_frozen_params=partial, flatten_optimizer_state_dict=True,
                            **({"strict": not partial} if loading else {}))


def _torch_state(eng, loading: bool) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    opts = _torch_options(eng.model, loading)
    return (get_model_state_dict(eng.model, options=opts),
            get_optimizer_state_dict(eng.model, eng.optimizer, options=opts))


def _torch_flat(msd: dict, osd: dict) -> dict:
    out = {MODEL + k: v for k, v in msd.items()}
    for k, v in osd.items():
        if k.startswith("state."):
            out[OPTIM + k] = v if torch.is_tensor(v) else torch.tensor(float(v))
    return out


def _torch_load(eng, path: Path, have: set[str]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    msd, osd = _torch_state(eng, loading=True)  # osd: torch initialises the optimizer's states first
    want = _torch_flat(msd, osd)
    _require(path, have, want)
    dcp.load(want, checkpoint_id=str(path))
    opts = _torch_options(eng.model, loading=True)
    set_model_state_dict(eng.model, {k: want[MODEL + k] for k in msd}, options=opts)
    osd = {k: (want[OPTIM + k] if OPTIM + k in want else v) for k, v in osd.items()}
    set_optimizer_state_dict(eng.model, eng.optimizer, osd, options=opts)


# ---------------------------------------------------------------- DeepSpeed ZeRO (safe_get/set_full_*)
def _zero(eng):
    """(the ZeRO optimizer, its base torch optimizer, the fp32 flat partitions it steps)."""
    zo = eng.ds.optimizer
    flats = getattr(zo, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if flats is None:
        flats = zo.fp32_partitioned_groups_flat  # ZeRO-3
    return zo, zo.optimizer, list(flats)


def _ds_state_keys(eng) -> list[str]:
    """The optimizer's per-element states (tensors shaped like the flat fp32 partition)."""
    _, base, flats = _zero(eng)
    keys = set()
    for f in flats:
        for k, v in base.state.get(f, {}).items():
            if torch.is_tensor(v) and v.shape == f.shape and v.dim() == 1:
                keys.add(k)
    every = [None] * dist.get_world_size()  # the same keys on every rank: the gathers below are collectives
    dist.all_gather_object(every, sorted(keys))
    return sorted(set().union(*every))


def _ds_step(eng) -> float | None:
    _, base, flats = _zero(eng)
    steps = [float(st[STEP]) for f in flats if STEP in (st := base.state.get(f, {}))]
    t = torch.tensor([max(steps) if steps else -1.0], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a rank whose partition is empty has no state
    return None if t.item() < 0 else t.item()


def _shape(p) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _tp_full_shape(eng, n: str, p) -> torch.Size:
    """The global shape of parameter `n`: AutoTP (runtime/ds_autotp.py) keeps a tp slice on each rank."""
    return eng.full_shapes[n] if getattr(eng, "tp", 1) > 1 else _shape(p)


def _named_trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _persistent_buffers(model) -> dict[str, torch.Tensor]:
    params = {n for n, _ in model.named_parameters()}
    names = set(model.state_dict().keys()) - params
    return {n: b for n, b in model.named_buffers() if n in names}


def _ds_save_state(eng) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from shardtrain.runtime.ds_autotp import to_full
    world, rank, tp = dist.get_world_size(), dist.get_rank(), getattr(eng, "tp", 1)
    keys, step = _ds_state_keys(eng), _ds_step(eng)
    out = {}
    for i, (n, p) in enumerate(_named_trainable(eng.model)):
        mine = i % world == rank  # every rank joins each gather; one rank keeps the result
        shape, full = _shape(p), _tp_full_shape(eng, n, p)
        v = to_full(n, safe_get_full_fp32_param(p).reshape(shape), full, tp)  # AutoTP: gathered over tp
        if mine:
            out[MODEL + n] = v.detach().float().reshape(full).cpu().clone()
        for k in keys:
            v = to_full(n, safe_get_full_optimizer_state(p, k).reshape(shape), full, tp)
            if mine:
                out[f"{OPTIM}state.{n}.{k}"] = v.detach().float().reshape(full).cpu().clone()
        if mine and step is not None:
            out[f"{OPTIM}state.{n}.{STEP}"] = torch.tensor(step, dtype=torch.float32)
    if not _partial(eng.model) and rank == 0:
        out.update({MODEL + n: b.detach().cpu().clone() for n, b in _persistent_buffers(eng.model).items()})
    return out


def _ds_ensure_states(eng, keys: list[str], step: float) -> None:
    """A fresh DeepSpeed optimizer has no state until its first step (torch optimizers create it lazily):
    create zero tensors for ``keys`` and the step count, then link them into DeepSpeed's per-parameter
    fragments (ZeRO-1/2: deepspeed/utils/mixed_precision_linkage.py lazy_init_hp_params_optimizer_state)."""
    zo, base, flats = _zero(eng)
    torch_step = type(base).__module__.startswith("torch.optim")  # torch keeps `step` as a tensor
    for f in flats:
        st = base.state[f]
        for k in keys:
            if k not in st:
                st[k] = torch.zeros_like(f)
        old = st.get(STEP)
        if torch.is_tensor(old) or (old is None and torch_step):
            st[STEP] = torch.tensor(step, dtype=torch.float32, device=f.device)
        else:
            st[STEP] = int(step)
    if hasattr(zo, "_hp_optimizer_states_linked"):  # ZeRO-1/2: re-link the fragments to the new tensors
        zo._hp_optimizer_states_linked = False
        zo._lazy_init_hp_params_optimizer_state()


def _chunks(named, n_keys: int):
    chunk, size = [], 0
    for n, p in named:
        b = _shape(p).numel() * 4 * (1 + n_keys)
        if chunk and size + b > LOAD_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append((n, p))
        size += b
    if chunk:
        yield chunk


def _pad_for_zero3(p, v: torch.Tensor) -> torch.Tensor:
    """ZeRO-3's set_full_hp_param narrows ``partition numel × rank`` out of the flat value: give the last
    rank's padding zeros to read (deepspeed/runtime/zero/stage3.py set_full_hp_param)."""
    if not hasattr(p, "ds_tensor"):
        return v
    need = p.ds_tensor.ds_numel * dist.get_world_size() - v.numel()
    return torch.cat([v.flatten(), v.new_zeros(need)]) if need > 0 else v


def _ds_load(eng, path: Path, have: set[str]) -> None:
    import torch.distributed.checkpoint as dcp
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from shardtrain.runtime.ds_autotp import to_local
    named = _named_trainable(eng.model)
    if not named:
        return
    first = named[0][0]
    keys = sorted(k[len(f"{OPTIM}state.{first}."):] for k in have if k.startswith(f"{OPTIM}state.{first}.")
                  and k.count(".") == f"{OPTIM}state.{first}.x".count("."))
    keys = [k for k in keys if k != STEP]
    own = _ds_state_keys(eng)
    if own and set(own) - set(keys):
        raise RuntimeError(f"checkpoint {path} holds optimizer states {keys} but this optimizer keeps {own}; "
                           "it was written for another optimizer (resume with the run's own train.optimizer)")
    want_step = {f"{OPTIM}state.{first}.{STEP}": torch.zeros((), dtype=torch.float32)}
    _require(path, have, want_step)
    dcp.load(want_step, checkpoint_id=str(path))
    _ds_ensure_states(eng, keys, float(next(iter(want_step.values()))))
    for chunk in _chunks(named, len(keys)):
        want = {}
        for n, p in chunk:
            full = _tp_full_shape(eng, n, p)
            want[MODEL + n] = torch.empty(full, dtype=torch.float32)
            want.update({f"{OPTIM}state.{n}.{k}": torch.empty(full, dtype=torch.float32) for k in keys})
        _require(path, have, want)
        dcp.load(want, checkpoint_id=str(path))
        for n, p in chunk:
            dev = eng.device

            def mine(key):  # AutoTP: this rank's tp slice of the global tensor
                return _pad_for_zero3(p, to_local(n, want[key], _shape(p), getattr(eng, "tp", 1)).to(dev))
            safe_set_full_fp32_param(p, mine(MODEL + n))
            for k in keys:
                safe_set_full_optimizer_state(p, mine(f"{OPTIM}state.{n}.{k}"), k)
        del want
    if not _partial(eng.model):
        bufs = _persistent_buffers(eng.model)
        if bufs:
            want = {MODEL + n: b.detach().cpu().clone() for n, b in bufs.items()}
            _require(path, have, want)
            dcp.load(want, checkpoint_id=str(path))
            for n, b in bufs.items():
                b.data.copy_(want[MODEL + n])
    _ds_refresh_working_copies(eng)


def _ds_refresh_working_copies(eng) -> None:
    """The forward runs the 16-bit (fp32 runs: working) copies: copy the loaded fp32 masters into them."""
    zo, _, flats = _zero(eng)
    if hasattr(zo, "update_lp_params"):  # ZeRO-1/2 (deepspeed/runtime/zero/stage_1_and_2.py)
        zo.update_lp_params()
    else:  # ZeRO-3: what its universal-checkpoint load does per sub-group (stage3.py)
        for i in range(len(flats)):
            zo._reassign_or_swap_out_partitioned_parameters(i)


def blockwise_states(eng) -> list[str]:
    """COLLECTIVE for DeepSpeed: optimizer states that are neither per element nor a scalar (bitsandbytes'
    8-bit AdamW keeps absmax/qmap per block of the flat partition). They cannot be assembled per parameter,
    so such a run keeps DeepSpeed's own checkpoint format (same strategy and world size only)."""
    if eng.kind is not Engine.DEEPSPEED:
        return []
    _, base, flats = _zero(eng)
    odd = {k for f in flats for k, v in base.state.get(f, {}).items()
           if torch.is_tensor(v) and v.dim() > 0 and v.shape != f.shape}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, sorted(odd))
    return sorted(set().union(*every))


# ---------------------------------------------------------------- the two entry points
def save(eng, path: Path, writer=None) -> None:
    """COLLECTIVE: write this engine's model and optimizer state into the DCP directory ``path``
    (``writer``: a DCP StorageWriter for it, e.g. one that hashes the files as it writes them)."""
    import torch.distributed.checkpoint as dcp
    if eng.kind is Engine.DEEPSPEED:
        state = _ds_save_state(eng)
    else:
        state = _torch_flat(*_torch_state(eng, loading=False))
    dcp.save(state, checkpoint_id=str(path), storage_writer=writer)


def load(eng, path: Path) -> None:
    """COLLECTIVE: load a portable checkpoint written by any engine on any number of ranks."""
    have = checkpoint_keys(path)
    if eng.kind is Engine.DEEPSPEED:
        _ds_load(eng, path, have)
    else:
        _torch_load(eng, path, have)
