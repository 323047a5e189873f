"""Everything `shardtrain emit` writes for one plan, as {file name: text} (pure: no file writes).

The directory doubles as a run directory for `python -m shardtrain.runtime.worker --run-dir DIR`
(run.yaml + plan.json + ds_config.json / fsdp.json), so `bash DIR/launch.sh` trains.
"""
from __future__ import annotations

import json
import shlex
import zlib
from dataclasses import dataclass

import yaml

from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import Engine
from shardtrain.emit import accelerate as acc
from shardtrain.emit.deepspeed import deepspeed_config
from shardtrain.emit.fsdp import fsdp_settings
from shardtrain.launcher.argv import deepspeed_argv, hostfile_text, render_launch_script, torchrun_argv

FORMATS = ("deepspeed", "trainer", "accelerate", "fsdp", "torchrun", "deepspeed-cmd", "hostfile")
PORT_BASE, PORT_SPAN = 20000, 10000
"""Default rendezvous port: derived from the run dir (stable, and two runs sharing a node rarely
collide; 29500, every launcher's default, is often taken on shared hosts)."""
LAUNCH_ENV = {"PYTHONUNBUFFERED": "1",
              # torchrun restarts re-use the rendezvous store otherwise (shared/notes/cpu-distributed.md)
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class EmitError(ValueError):
    """Missing information for an output (e.g. hosts of a multi-node job)."""


@dataclass(frozen=True)
class Site:
    """Where the job runs: the run directory path the scripts refer to, and multi-node addresses."""
    run_dir: str
    hosts: tuple[str, ...] = ()
    master_addr: str | None = None
    port: int | None = None
    """Rendezvous / master port; None = derived from run_dir (see PORT_BASE)."""

    @property
    def master_port(self) -> int:
        if self.port is not None:
            return self.port
        return PORT_BASE + zlib.crc32(self.run_dir.encode()) % PORT_SPAN

    def head(self, nodes: int) -> str | None:
        if self.hosts and len(self.hosts) != nodes:
            raise EmitError(f"--hosts: {len(self.hosts)} hosts given for hardware.nodes {nodes}; list one per node")
        return self.master_addr or (self.hosts[0] if self.hosts else None)


def _ds_kwargs(cfg) -> dict:
    if cfg is None:
        return {}
    t = cfg.train
    return {"grad_clip": t.grad_clip, "lr": t.lr, "weight_decay": t.weight_decay, "nvme_path": cfg.hardware.nvme_path}


def torchrun_command(plan: Plan, site: Site) -> list[str]:
    hw = plan.hardware
    head = site.head(hw.nodes)
    if hw.nodes > 1 and not head:
        raise EmitError(f"hardware.nodes {hw.nodes}: torchrun needs the first node's address for the c10d "
                        "rendezvous; pass --master-addr HOST or --hosts h1,h2,...")
    endpoint = f"{head}:{site.master_port}" if hw.nodes > 1 else None
    rid = "shardtrain-" + (site.run_dir.rstrip("/").rsplit("/", 1)[-1] or "run")
    return torchrun_argv(nproc_per_node=hw.gpus_per_node, nnodes=hw.nodes, rdzv_endpoint=endpoint,
                         rdzv_id=rid if endpoint else None, script_args=["--run-dir", site.run_dir])


def deepspeed_command(plan: Plan, site: Site) -> list[str]:
    hw = plan.hardware
    head = site.head(hw.nodes)
    if hw.nodes > 1:
        if not site.hosts:
            raise EmitError(f"hardware.nodes {hw.nodes}: the deepspeed launcher needs a hostfile; pass --hosts h1,h2,...")
        return deepspeed_argv(num_gpus=hw.gpus_per_node, num_nodes=hw.nodes, hostfile=f"{site.run_dir}/hostfile",
                              master_addr=head, master_port=site.master_port, script_args=["--run-dir", site.run_dir])
    return deepspeed_argv(num_gpus=hw.gpus_per_node, master_port=site.master_port,
                          script_args=["--run-dir", site.run_dir])


def render(fmt: str, plan: Plan, site: Site, cfg=None) -> str:
    """One output format as text (`shardtrain emit --format FMT`)."""
    if fmt in ("deepspeed", "trainer"):
        return json.dumps(deepspeed_config(plan, trainer=fmt == "trainer", **_ds_kwargs(cfg)), indent=2) + "\n"
    if fmt == "fsdp":
        return json.dumps(fsdp_settings(plan).to_dict(), indent=2) + "\n"
    if fmt == "accelerate":
        d = acc.accelerate_config(plan, ds_config_path=f"{site.run_dir}/ds_config.json",
                                  main_process_ip=site.head(plan.hardware.nodes), main_process_port=site.master_port)
        return acc.render_yaml(d, acc.notes(plan))
    if fmt == "torchrun":
        return shlex.join(torchrun_command(plan, site)) + "\n"
    if fmt == "deepspeed-cmd":
        return shlex.join(deepspeed_command(plan, site)) + "\n"
    if fmt == "hostfile":
        if not site.hosts:
            raise EmitError("hostfile: pass --hosts h1,h2,... (one per node)")
        site.head(plan.hardware.nodes)
        return hostfile_text(site.hosts, plan.hardware.gpus_per_node)
    raise EmitError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")


def bundle(plan: Plan, site: Site, cfg=None) -> dict[str, str]:
    """All files for the plan: plan.json, run.yaml (with a config), engine config, accelerate.yaml,
    launch.sh (deepspeed launcher for ZeRO plans unless run.launcher says torchrun), hostfile."""
    engine = plan.strategy.engine
    files = {"plan.json": json.dumps(plan.to_json(), indent=2) + "\n"}
    if cfg is not None:
        files["run.yaml"] = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if engine is Engine.DEEPSPEED:
        files["ds_config.json"] = render("deepspeed", plan, site, cfg)
    if engine is Engine.FSDP:
        files["fsdp.json"] = render("fsdp", plan, site, cfg)
    files["accelerate.yaml"] = render("accelerate", plan, site, cfg)
    launcher = getattr(getattr(cfg, "run", None), "launcher", "auto")
    use_ds = launcher == "deepspeed" or (launcher == "auto" and engine is Engine.DEEPSPEED)
    argv = deepspeed_command(plan, site) if use_ds else torchrun_command(plan, site)
    c = plan.chosen
    where = (f"{plan.hardware.nodes} node(s) x {plan.hardware.gpus_per_node} GPUs, strategy {c.strategy.value}, "
             f"micro batch {c.micro_batch_size} x accumulation {c.grad_accum_steps}")
    if plan.hardware.nodes > 1:
        where += ("\nrun on the first node (the launcher reaches the others over ssh/pdsh)" if use_ds
                  else "\nrun the same script on every node")
    files["launch.sh"] = render_launch_script(argv, LAUNCH_ENV, comment=where)
    if use_ds and plan.hardware.nodes > 1:
        files["hostfile"] = render("hostfile", plan, site, cfg)
    return files
