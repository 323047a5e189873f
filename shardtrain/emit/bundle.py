"""Everything `shardtrain emit` writes for one plan, as {file name: text} (pure: no file writes).

Two audiences, with distinct files where they must differ:
- the user's own script (HF Trainer / TRL, accelerate loop, peft): trainer_args.json, hf_ds_config.json
  ("auto" where the Trainer/accelerate fill values), lora_config.json / bnb_config.json, accelerate.yaml,
  and README.md listing what the script must do (emit/trainer.py, emit/readme.py);
- shardtrain's worker: the directory doubles as a run directory for `python -m shardtrain.runtime.worker
  --run-dir DIR` (run.yaml + plan.json + ds_config.json / fsdp.json), so `bash DIR/launch.sh` trains.
`shardtrain check` recognises and passes every one of these files (emit/check_bundle.py).
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from shardtrain import rundir_format as rf
from shardtrain.compiler.plan import Plan
from shardtrain.compiler.specs import Engine, Launcher
from shardtrain.emit import accelerate as acc
from shardtrain.emit import trainer as T
from shardtrain.emit.deepspeed import deepspeed_config
from shardtrain.emit.fsdp import fsdp_settings
from shardtrain.emit.readme import readme
from shardtrain.launcher import rankstart as rs

FORMATS = ("deepspeed", "trainer", "trainer-args", "accelerate", "fsdp", "torchrun", "deepspeed-cmd", "hostfile",
           "readme")
README_MD = "README.md"
ACCELERATE_YAML = "accelerate.yaml"
LAUNCH_SH = "launch.sh"
HOSTFILE = "hostfile"


class EmitError(ValueError):
    """Missing information for an output (e.g. hosts of a multi-node job)."""


@dataclass(frozen=True)
class Site:
    """Where the job runs: the run directory path the scripts refer to, and multi-node addresses."""
    run_dir: str
    hosts: tuple[str, ...] = ()
    master_addr: str | None = None
    port: int | None = None
    """Rendezvous / master port; None = derived from run_dir (rankstart's port policy)."""

    @property
    def master_port(self) -> int:
        if self.port is not None:
            return self.port
        return rs.rendezvous_port(rs.run_dir_key(self.run_dir))

    def head(self, nodes: int) -> str | None:
        if self.hosts and len(self.hosts) != nodes:
            raise EmitError(f"--hosts: {len(self.hosts)} hosts given for hardware.nodes {nodes}; list one per node")
        return self.master_addr or (self.hosts[0] if self.hosts else None)


def torchrun_command(plan: Plan, site: Site) -> list[str]:
    hw = plan.hardware
    head = site.head(hw.nodes)
    if hw.nodes > 1 and not head:
        raise EmitError(f"hardware.nodes {hw.nodes}: torchrun needs the first node's address for the c10d "
                        "rendezvous; pass --master-addr HOST or --hosts h1,h2,...")
    endpoint = f"{head}:{site.master_port}" if hw.nodes > 1 else None
    return rs.torchrun_argv(nproc_per_node=hw.gpus_per_node, nnodes=hw.nodes, rdzv_endpoint=endpoint,
                            rdzv_id=rs.rdzv_id(site.run_dir) if endpoint else None,
                            script_args=["--run-dir", site.run_dir])


def deepspeed_command(plan: Plan, site: Site) -> list[str]:
    hw = plan.hardware
    head = site.head(hw.nodes)
    if hw.nodes > 1:
        if not site.hosts:
            raise EmitError(f"hardware.nodes {hw.nodes}: the deepspeed launcher needs a hostfile; pass --hosts h1,h2,...")
        return rs.deepspeed_argv(num_gpus=hw.gpus_per_node, num_nodes=hw.nodes, hostfile=f"{site.run_dir}/hostfile",
                                 master_addr=head, master_port=site.master_port,
                                 script_args=["--run-dir", site.run_dir])
    return rs.deepspeed_argv(num_gpus=hw.gpus_per_node, master_port=site.master_port,
                             script_args=["--run-dir", site.run_dir])


def render(fmt: str, plan: Plan, site: Site, cfg=None) -> str:
    """One output format as text (`shardtrain emit --format FMT`)."""
    if fmt == "deepspeed":
        return _json(deepspeed_config(plan, **T.ds_kwargs(plan, cfg)))
    if fmt == "trainer":
        return _json(T.trainer_deepspeed_config(plan, cfg))
    if fmt == "trainer-args":
        return _json(T.training_arguments(plan, cfg, ds_config_path=f"{site.run_dir}/{T.HF_DS_CONFIG_JSON}"))
    if fmt == "fsdp":
        return _json(fsdp_settings(plan).to_dict())
    if fmt == "readme":
        return readme(plan, list(bundle(plan, site, cfg)), cfg)
    if fmt == "accelerate":
        # the Trainer-facing DeepSpeed JSON: a Trainer under `accelerate launch` runs trainer_config_process
        # on it (propagate_args_to_deepspeed), so a fixed lr would be a mismatch with its learning_rate
        d = acc.accelerate_config(plan, ds_config_path=f"{site.run_dir}/{T.HF_DS_CONFIG_JSON}",
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
        return rs.hostfile_text(site.hosts, plan.hardware.gpus_per_node)
    raise EmitError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")


def bundle(plan: Plan, site: Site, cfg=None) -> dict[str, str]:
    """All files for the plan: plan.json, run.yaml (with a config), the worker's engine config, the Trainer's
    DeepSpeed JSON and arguments, LoRA/QLoRA configs, accelerate.yaml, launch.sh (deepspeed launcher for ZeRO
    plans unless run.launcher says torchrun), hostfile, README.md."""
    engine = plan.strategy.engine
    with_facts = plan
    if cfg is not None:  # a run dir for the worker: plan.json carries the runtime facts (emit/runtime.py)
        from shardtrain.emit.runtime import with_runtime_facts
        with_facts = with_runtime_facts(cfg, plan)
    files = {rf.PLAN_JSON: rf.json_text(with_facts.to_json())}
    if cfg is not None:
        files[rf.RUN_YAML] = rf.config_text(cfg.to_dict())
    if engine is Engine.DEEPSPEED:
        files[rf.DS_CONFIG_JSON] = render("deepspeed", plan, site, cfg)
        files[T.HF_DS_CONFIG_JSON] = render("trainer", plan, site, cfg)
    if engine is Engine.FSDP:
        files[rf.FSDP_JSON] = render("fsdp", plan, site, cfg)
    files[T.TRAINER_ARGS_JSON] = render("trainer-args", plan, site, cfg)
    for name, d in ((T.LORA_CONFIG_JSON, T.lora_config(plan)), (T.BNB_CONFIG_JSON, T.bnb_config(plan))):
        if d is not None:
            files[name] = _json(d)
    try:
        files[ACCELERATE_YAML] = render("accelerate", plan, site, cfg)
    except acc.AccelerateMeshError:  # a mesh accelerate refuses: the README says why (emit/readme.py)
        pass
    use_ds = rs.choose_launcher(None, cfg, plan) is Launcher.DEEPSPEED
    argv = deepspeed_command(plan, site) if use_ds else torchrun_command(plan, site)
    c = plan.chosen
    where = (f"{plan.hardware.nodes} node(s) x {plan.hardware.gpus_per_node} GPUs, strategy {c.strategy.value}, "
             f"micro batch {c.micro_batch_size} x accumulation {c.grad_accum_steps}")
    if plan.hardware.nodes > 1:
        where += ("\nrun on the first node (the launcher reaches the others over ssh/pdsh)" if use_ds
                  else "\nrun the same script on every node")
    files[LAUNCH_SH] = rs.render_launch_script(argv, {**rs.WORKER_ENV, **rs.RESTART_ENV}, comment=where)
    if use_ds and plan.hardware.nodes > 1:
        files[HOSTFILE] = render("hostfile", plan, site, cfg)
    files[README_MD] = readme(plan, [*files, README_MD], cfg)
    return files


def _json(d: dict) -> str:
    return json.dumps(d, indent=2) + "\n"
