"""Process-group set-up: the only place (besides the engines) that initialises torch.distributed.

torchrun and the deepspeed launcher both export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT. Without them (a plain `python -m shardtrain.runtime.worker`) we run as a 1-rank group
on a free local port, so every engine (DDP, FSDP2, DeepSpeed) still finds an initialised group.
Backend: nccl on CUDA, gloo on CPU (DeepSpeed then wraps the existing group; with
DS_ACCELERATOR=cpu it also loads its shared-memory comm op, prebuilt by .ci/build_ds_ops.py).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(pref: str, local_rank: int) -> torch.device:
    """`run.device`: auto (cuda if present, else cpu) | cpu | cuda."""
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device: cuda requested but torch.cuda.is_available() is False; "
                               "set run.device: cpu (or auto)")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_cores_for_rank(usable: list[int] | tuple[int, ...], local_rank: int, local_world_size: int,
                       world_size: int) -> tuple[int, ...]:
    """The cores a CPU rank binds to: the local_rank-th of local_world_size equal contiguous blocks of
    the cores this process may use (what DeepSpeed's `--bind_cores_to_rank` does for CPU training,
    deepspeed/launcher/launch.py). () = do not bind: one rank (nothing to separate), fewer cores than
    ranks, or ranks on several nodes (several "nodes" may share one machine, e.g. a test cluster,
    and would bind their local ranks to the same cores). The launcher already gives each rank
    OMP_NUM_THREADS = cores // ranks (launcher/rankstart.py), the block's size.

    Why: unbound, the scheduler migrates ranks and gloo's threads between cores; bound, each rank's
    compute thread and its gloo threads keep their core's caches. A small gain, measured on 2 cores
    (benchmarks/worker_ab.py, results/worker_ab.md): unbound steps took 2.9% (tiny Llama, DDP) and 1.3%
    (26M model, DDP) longer at the median; tiny ZeRO-2 the same within noise (-0.8%)."""
    cores = sorted(usable)
    if local_world_size <= 1 or world_size != local_world_size or len(cores) < local_world_size:
        return ()
    block = len(cores) // local_world_size
    return tuple(cores[local_rank * block:(local_rank + 1) * block])


def bind_cpu_cores() -> tuple[int, ...]:
    """Bind this rank's process (its threads started later inherit the mask) per cpu_cores_for_rank."""
    # torchrun exports LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE (deepspeed/launcher/launch.py)
    local_world = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    cores = cpu_cores_for_rank(tuple(os.sched_getaffinity(0)), int(os.environ.get("LOCAL_RANK", 0)),
                               int(local_world), int(os.environ.get("WORLD_SIZE", 1)))
    if cores:
        os.sched_setaffinity(0, cores)
    return cores


def init_distributed(device_pref: str = "auto", timeout_s: int = 600, *, bind_cores: bool = False) -> DistInfo:
    """Initialise (or reuse) the default process group and pick this rank's device. `bind_cores`
    (run.bind_cpu_cores): on CPU, bind the rank to its own cores first, so that gloo's threads,
    started with the process group, inherit the mask."""
    if "RANK" not in os.environ:  # single process: make a 1-rank group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = select_device(device_pref, local_rank)
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed's CPU accelerator sizes itself from LOCAL_SIZE (else the NUMA node count).
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if bind_cores and not dist.is_initialized() and hasattr(os, "sched_setaffinity"):
            bind_cpu_cores()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=device, backend=str(dist.get_backend()))


def init_deepspeed_comm() -> None:
    """Make deepspeed.comm wrap the existing torch process group (zero.Init reads its world size)."""
    import deepspeed
    deepspeed.init_distributed(dist_backend=str(dist.get_backend()), dist_init_required=False)
    _unlink_deepspeed_shm()


def _unlink_deepspeed_shm() -> None:
    """DeepSpeed's CPU shared-memory all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp shm_initialize)
    creates one ~70 MB /dev/shm segment per rank, `deepspeed_allreduce_buffer_{uid}_{MASTER_ADDR}_
    {MASTER_PORT}_{rank}`, and never calls its shared_close(): every CPU run leaked them (RAM in tmpfs;
    19 GB after a day of tests here). Once every rank has mapped its peers' segments (the barrier), the
    names can go: the mappings stay valid and the memory is freed when the processes exit."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port) or not os.path.isdir("/dev/shm"):
        return
    dist.barrier()
    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    try:
        os.unlink(name)
    except OSError:
        pass  # not created (no shm op, ranks on several nodes) or already gone


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def reduce_sum(t: torch.Tensor) -> list[float]:
    """Sum a small tensor over all ranks (one collective) and read it back (one host sync)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (float64 so token counts stay exact)."""
    return reduce_sum(torch.tensor(values, dtype=torch.float64, device=device))


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
