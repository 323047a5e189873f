"""Preflight: check the plan against THIS machine before anything is spawned (issue 13 (f)).

Every check returns problems as one line each: what is wrong, with numbers, and the fix. `shardtrain
launch` prints them all (`shardtrain: error: preflight: …`) and exits 1 without starting a process.
Machine facts are read from /proc and the file system (no torch import: the launcher stays fast);
they are passed in as a :class:`Machine` so tests can describe a machine that is not this one.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from shardtrain.compiler.specs import Device, Engine
from shardtrain.launcher import hosts
from shardtrain.units import fmt_bytes

#: Bytes a checkpoint stores per parameter: fp32 weights (4) for every parameter the run saves, plus
#: AdamW's two fp32 moments (8) per trainable one (torch.optim.AdamW state exp_avg/exp_avg_sq);
#: DeepSpeed adds the fp32 master copy (4) next to the 16-bit module weights (deepspeed/runtime/zero/
#: stage_1_and_2.py: single_partition_of_fp32_groups is saved in the optimizer state). An estimate
#: for the disk check only (the real size is measured before each save, runtime/checkpoint.py).
CKPT_WEIGHT_BYTES, CKPT_STATE_BYTES, CKPT_MASTER_BYTES = 4, 8, 4


@dataclass(frozen=True)
class Machine:
    gpus: int
    """Usable NVIDIA GPUs (hosts.count_local_gpus)."""
    gpu_memory_bytes: tuple[int, ...] = ()
    """Per visible GPU, when known (nvidia-smi); empty: unknown, not checked."""
    host_memory_bytes: int = 0
    """MemTotal of /proc/meminfo; 0: unknown."""
    host_available_bytes: int = 0
    """MemAvailable of /proc/meminfo; 0: unknown."""
    cpus: int = 1


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, fix: str) -> None:
        self.problems.append(f"{what}; fix: {fix}")


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, _, v = line.partition(":")
            parts = v.split()
            if parts and parts[0].isdigit():
                out[k] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _gpu_memory() -> tuple[int, ...]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    try:
        p = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=20)
        return tuple(int(x.strip()) * 2**20 for x in p.stdout.splitlines() if x.strip().isdigit())
    except (OSError, subprocess.TimeoutExpired):
        return ()


def this_machine(gpus: int) -> Machine:
    mi = _meminfo()
    return Machine(gpus=gpus, gpu_memory_bytes=_gpu_memory() if gpus else (), host_memory_bytes=mi.get("MemTotal", 0),
                   host_available_bytes=mi.get("MemAvailable", 0), cpus=hosts.cpu_count())


def _existing_ancestor(p: Path) -> Path:
    p = Path(p).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(d: Path) -> str | None:
    """None if a file can be created in d (or in its nearest existing ancestor), else why not."""
    base = _existing_ancestor(d)
    if not base.is_dir():
        return f"{base} is not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=base, prefix=".shardtrain-preflight-"):
            pass
    except OSError as e:
        return f"cannot create files in {base} ({e.strerror})"
    return None


def checkpoint_bytes(plan, strategy_is_deepspeed: bool) -> int:
    n, t = plan.model.num_params, plan.chosen.trainable_params
    saved = n if t == n else t  # LoRA: only the adapter is saved
    return saved * CKPT_WEIGHT_BYTES + t * (CKPT_STATE_BYTES + (CKPT_MASTER_BYTES if strategy_is_deepspeed else 0))


def check(cfg, plan, *, machine: Machine, device: Device | str, nproc: int, run_dir: Path,
          master_port: int | None = None, node_rank: int = 0, entry=None) -> Report:
    """All preflight checks; nothing is started or written (a temp file is created and removed).
    ``entry``: the user's own command (rankstart.Entrypoint), checked instead of the training data."""
    r = Report()
    if entry is not None:
        _user_command(entry, r)
    c = plan.chosen
    per_rank = int(c.per_gpu.total)
    # --- device kind / count / memory ------------------------------------------------------------
    if device == Device.CPU:
        need = per_rank * nproc
        forced = cfg.run.device is Device.CPU
        avail = machine.host_available_bytes or machine.host_memory_bytes
        if avail and need > avail and not forced:
            r.add(f"the plan is for {plan.hardware.gpus_per_node}× {plan.hardware.gpu_name} GPUs "
                  f"({fmt_bytes(per_rank)} per GPU) but no GPU is visible here; on CPU its {nproc} processes would "
                  f"need ~{fmt_bytes(need)} of RAM, {fmt_bytes(avail)} is available",
                  "run on a machine with the planned GPUs, or shrink the job (a smaller --model, --seq-len, "
                  "--micro-batch 1); or set run.device: cpu to force a CPU run anyway")
        elif avail and need > avail:
            r.notes.append(f"run.device: cpu forces a CPU run although its {nproc} processes may need "
                           f"~{fmt_bytes(need)} of RAM ({fmt_bytes(avail)} available)")
        elif not forced:
            r.notes.append(f"no GPU visible: running the {plan.hardware.gpu_name} plan on {nproc} CPU processes "
                           f"(~{fmt_bytes(need)} of RAM); set run.device: cpu to say so explicitly")
    else:
        if nproc > machine.gpus:
            r.add(f"the plan runs {nproc} processes per node but {machine.gpus} GPU(s) are visible here",
                  f"pass --nproc-per-node {machine.gpus} (the plan is recompiled) or make the GPUs visible "
                  "(CUDA_VISIBLE_DEVICES)")
        small = [m for m in machine.gpu_memory_bytes[:nproc] if m < plan.gpu_memory_bytes]
        if small:
            r.add(f"the plan assumes {fmt_bytes(plan.gpu_memory_bytes)} per GPU; this machine's GPUs have "
                  f"{fmt_bytes(min(small))}", f"re-plan with --gpu-memory {min(small) // 2**30}GiB")
    # --- host RAM per node --------------------------------------------------------------------------
    host_need = int(c.cpu_memory_per_node_bytes)
    if machine.host_memory_bytes and host_need > machine.host_memory_bytes:
        r.add(f"the plan needs {fmt_bytes(host_need)} of host RAM per node (hardware.cpu_memory assumed "
              f"{fmt_bytes(plan.hardware.cpu_memory_bytes)}); this node has {fmt_bytes(machine.host_memory_bytes)}",
              f"re-plan with --cpu-memory {machine.host_memory_bytes // 2**30}GiB (the planner then avoids CPU "
              "offload that does not fit)")
    # --- processes ----------------------------------------------------------------------------------
    if device == Device.CPU and nproc > machine.cpus:
        if getattr(cfg.run, "oversubscribe", False):
            r.notes.append(f"run.oversubscribe: {nproc} CPU processes share {machine.cpus} core(s): steps are several "
                           "times slower than with a core per rank")
        else:
            r.add(f"{nproc} CPU processes requested but this machine has {machine.cpus} CPU core(s)",
                  f"pass --nproc-per-node {machine.cpus} (or fewer), or set run.oversubscribe: true "
                  "(`launch --oversubscribe`) to run them anyway, e.g. a 4-rank mesh test on 2 cores")
    _mesh(plan, device, r, own_script=entry is not None)
    # --- model, tokenizer, data ------------------------------------------------------------------
    for key, p in (("model.name", cfg.model.name), ("model.tokenizer", cfg.model.tokenizer)):
        if p and (os.sep in p or p.startswith(".")):
            if not Path(p).exists():
                r.add(f"{key}: {p} does not exist", "give an existing config.json / checkpoint directory")
            elif not os.access(p, os.R_OK):
                r.add(f"{key}: {p} is not readable", f"chmod u+r {p}")
    if entry is None:  # an own script reads its own data
        _data(cfg, r)
    # --- run / checkpoint dirs, NVMe, port --------------------------------------------------------
    why = _writable(run_dir)
    if why:
        r.add(f"run dir {run_dir}: {why}", "pass --run-dir to a writable place or change run.output_dir")
    else:
        is_ds = plan.strategy.engine is Engine.DEEPSPEED
        keep = getattr(cfg.run, "keep_checkpoints", 3)
        n_ckpt = (min(keep, max(1, cfg.train.steps // cfg.run.checkpoint_every)) if cfg.run.checkpoint_every else 1) + 1
        need = checkpoint_bytes(plan, is_ds) * n_ckpt + plan.model.num_params * 4  # + final export (fp32)
        free = shutil.disk_usage(_existing_ancestor(run_dir)).free
        if need > free:
            r.add(f"run dir {run_dir}: {fmt_bytes(free)} free, the planned checkpoints ({n_ckpt} kept at once) and "
                  f"the final export need ~{fmt_bytes(need)}", "free space, lower run.keep_checkpoints, or pass "
                  "--run-dir on a larger disk")
    if plan.chosen.nvme_bytes:
        nv = plan.hardware.nvme_path
        if not nv or not Path(nv).is_dir():
            r.add(f"hardware.nvme_path: {nv!r} does not exist (the {plan.strategy.value} plan offloads "
                  f"{fmt_bytes(plan.chosen.nvme_bytes)} there)", "create it on a local NVMe drive, or set "
                  "hardware.nvme_path to an existing one")
        else:
            why = _writable(Path(nv))
            free = shutil.disk_usage(nv).free
            if why:
                r.add(f"hardware.nvme_path: {why}", f"chmod u+w {nv} or choose another directory")
            elif free < plan.chosen.nvme_bytes:
                r.add(f"hardware.nvme_path {nv}: {fmt_bytes(free)} free, the plan needs "
                      f"{fmt_bytes(plan.chosen.nvme_bytes)}", "free space there or pick a larger drive")
    if master_port is not None and node_rank == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", master_port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    r.add(f"rendezvous port {master_port} is in use on this machine",
                          "pass another --master-port (or omit it: a free one is chosen on one node)")
    return r


def _mesh(plan, device, r: Report, own_script: bool = False) -> None:
    """What the runtime cannot run on this machine's device mesh (issue 18), before any rank starts.
    ``own_script``: the user's command runs the mesh itself (accelerate's parallelism_config runs ring
    cp through torch's context_parallel on CUDA). Ring cp runs on CUDA either way (shardtrain's FSDP2
    engine: runtime/ring_attention.py; the planner keeps it off DeepSpeed); only CPU is refused."""
    from shardtrain.compiler.specs import CpMode, Method
    dims, c = plan.parallel, plan.chosen
    if dims.cp > 1 and dims.cp_mode is CpMode.RING and device == Device.CPU:
        r.add(f"parallel.cp_mode: ring (cp {dims.cp}) cannot run on CPU: torch's context_parallel has no CPU "
              "kernel (its sharding rules cover CUDA flash / memory-efficient attention only)",
              "set parallel.cp_mode: ulysses (--cp-mode ulysses), which runs on CPU and GPU")
    if dims.tp > 1 and c.method is Method.QLORA:
        r.add(f"QLoRA with parallel.tp {dims.tp}: bitsandbytes' 4-bit Linear cannot be split by DTensor tensor "
              "parallel", "set parallel.tp: 1 (--tp 1; shard with dp_shard instead) or train.method: lora")


def _user_command(entry, r: Report) -> None:
    """The script (or program) after `--` must exist before N ranks fail on it at once."""
    from shardtrain.launcher.rankstart import EntryKind
    target = entry.target
    if entry.kind is EntryKind.SCRIPT and not Path(target).is_file():
        r.add(f"your script {target} does not exist (in {os.getcwd()})",
              "give the training script's path after `--`, e.g. -- python path/to/train.py")
    elif entry.kind is EntryKind.PROGRAM and not shutil.which(target):
        r.add(f"your command {target} is neither an executable file nor on PATH",
              "give an executable after `--` (or -- python train.py)")


def _data(cfg, r: Report) -> None:
    try:  # issue 12 (H3): the launcher's data validation, when present, reads records the runtime's way
        from shardtrain.launcher.datacheck import validate_training_data
    except ImportError:
        validate_training_data = None
    from shardtrain.config import hub
    from shardtrain.config.schema import ConfigError
    before = len(r.problems)
    for key, p in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if not p:
            continue
        try:  # a cached Hub dataset id reads from its snapshot, as the ranks will (emit/runtime.py)
            path = hub.dataset_source(p)
        except FileNotFoundError:
            r.add(f"{key}: {p} does not exist", "point it at the training data")
            continue
        except ValueError as e:  # an uncached Hub id: its message carries the `hf download` fix
            r.problems.append(f"{key}: {e}")
            continue
        if path.is_file() and path.stat().st_size == 0:
            r.add(f"{key}: {p} is empty", "point it at the training data")
        elif not os.access(path, os.R_OK):
            r.add(f"{key}: {p} is not readable", f"chmod u+r {path}")
    if validate_training_data is not None and len(r.problems) == before:
        try:
            validate_training_data(cfg)
        except ConfigError as e:
            r.problems.append(str(e))
