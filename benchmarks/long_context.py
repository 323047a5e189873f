"""The longest trainable sequence (issue 20, point 6): `shardtrain plan --max seq-len --json`, run as a user
runs it (the CLI, one subprocess per setup), for Llama-3.1-8B and -70B on 1 x 80 GB, 8 x 80 GB (one node)
and 4 x 8 x 80 GB, everything else at its default (savers `auto`: the planner picks checkpointing, the loss
path, tiled MLP, checkpoint offload, the mesh and the strategy). Prints a markdown table beside the
figures the published long-context work (ALST) reports for the same setups, with their sources.

    python benchmarks/long_context.py [--extra "--attention flash"] [--json out.json]

Each setup is planned twice: with ALST's host RAM (--cpu-memory 1.9TB: "H100 80GB nodes w/ 8 GPUs per
node, 1.9TB CPU memory", ArcticTraining projects/sequence-parallelism/README.md) — the main columns — and
with the planner's default host RAM assumption (1 TiB per node, said in the plan's `assumed`).

Pure planning (no GPU, no torch): seconds on a laptop. Asserts nothing; the numbers are the planner's.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

MODELS = ("llama-3.1-8b", "llama-3.1-70b")
GPU = "h100-80gb"


@dataclass(frozen=True)
class Setup:
    label: str
    nodes: int
    gpus_per_node: int

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def flags(self) -> list[str]:
        return ["--gpu", GPU, "--nodes", str(self.nodes), "--gpus-per-node", str(self.gpus_per_node)]


SETUPS = (Setup("1 x 80 GB", 1, 1), Setup("8 x 80 GB", 1, 8), Setup("4 x 8 x 80 GB", 4, 8))

ALST_PAPER = "Bekman et al., Arctic Long Sequence Training (ALST), arXiv:2506.13996, abstract and Figure 1"
ALST_RECIPES = "https://github.com/snowflakedb/ArcticTraining/tree/main/projects/sequence-parallelism"
#: (model, GPUs) -> (figure, where it is published). The 8B figures are the paper's headline numbers (also
#: the Snowflake engineering blog "Arctic Long Sequence Training (ALST): Scalable And Efficient Training For
#: Multi-Million Token Sequences" and DeepSpeed's docs/_tutorials/ulysses-alst-sequence-parallelism.md);
#: the 70B figures are the `max_length` of the released ArcticTraining recipes for that setup (the paper's
#: 70B tables were not read here).
PUBLISHED = {
    ("llama-3.1-8b", 1): ("500K", f"{ALST_PAPER}; recipe run-h100-sp1-llama-8b.yml (max_length 500000)"),
    ("llama-3.1-8b", 8): ("3.7M", f"{ALST_PAPER}; recipe run-h100-sp8-llama-8b.yml (max_length 3800000)"),
    ("llama-3.1-8b", 32): ("15M", f"{ALST_PAPER}; recipe run-h100-sp32-llama-8b.yml (max_length 15_500_000)"),
    ("llama-3.1-70b", 1): ("-", "no published figure (70B's bf16 weights alone are 141 GB)"),
    ("llama-3.1-70b", 8): ("200K", "recipe run-h100-sp8-llama-70b.yml (max_length 200_000; checkpoint offload "
                                   "off: 'hurts seqlen as we are already offloading too much at 70b')"),
    ("llama-3.1-70b", 32): ("4M", "recipe run-h100-sp32-llama-70b.yml (max_length 4_000_000, "
                                  "'at the brink of cpu-oom')"),
}


def run_max(model: str, setup: Setup, extra: list[str]) -> tuple[list[str], dict | str, float]:
    """One `shardtrain plan --max seq-len --json` call: (argv as a user types it, the JSON or the one-line
    refusal, wall seconds)."""
    argv = ["shardtrain", "plan", "--model", model, *setup.flags(), *extra, "--max", "seq-len", "--json"]
    exe = str(Path(sys.executable).with_name("shardtrain"))
    t0 = time.perf_counter()
    proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return argv, (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1], wall
    return argv, json.loads(proc.stdout), wall


def mesh_label(par: dict) -> str:
    """"cp 8 (ulysses)", "dp_shard 4 × tp 2", ... — the plan's own mesh label (ParallelDims.label), "1 rank"
    for one rank."""
    from shardtrain.compiler.specs import ParallelDims
    dims = ParallelDims.from_json(par)
    return dims.label() if dims.world > 1 else "1 rank"


def savers(d: dict) -> str:
    """The memory savers the plan chose (the resolved `auto`s)."""
    out = [f"ckpt {d['gradient_checkpointing']}", f"loss {d['loss']}"]
    if d.get("tiled_mlp_tiles", 1) > 1:
        out.append(f"tiled MLP ×{d['tiled_mlp_tiles']}")
    if d.get("ckpt_offload"):
        out.append("ckpt offload")
    if d.get("activation_offload", "none") != "none":
        out.append(f"activation offload {d['activation_offload']}")
    return ", ".join(out)


def gib(b: int) -> str:
    return f"{b / 2**30:.1f} GiB"


def row(model: str, setup: Setup, res: dict | str) -> list[str]:
    pub, _src = PUBLISHED[(model, setup.gpus)]
    if isinstance(res, str):
        return [model, setup.label, "nothing fits", "-", "-", "-", res.removeprefix("shardtrain: ")[:200], pub]
    m = res["max"]
    strategy = res["strategy"] + (f" (optimizer on {res['offload_optimizer']}, params on {res['offload_params']})"
                                  if res.get("offload_optimizer", "none") != "none" else "")
    limit = f"{m['limited_by']} ({gib(m['limited_by_bytes'])}) at {m['next']:,}"
    if m.get("limited_by_part"):
        limit += f"; largest part: {m['limited_by_part']} ({gib(m['limited_by_part_bytes'])})"
    return [model, setup.label, f"{m['value']:,}", mesh_label(res["parallel"]), strategy, savers(res), limit, pub]


ALST_HOST = "1.9TB"

HEAD = ["model", "GPUs", "longest seq (plan, 1.9 TB host RAM)", "mesh", "strategy", "savers chosen", "limited by (term at the next step)",
        "ALST published", "longest seq (plan, default 1 TiB host RAM)"]


def table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--extra", default="", help="more plan flags for every call, e.g. \"--cpu-memory 1.9TB\"")
    ap.add_argument("--json", default=None, help="also write every call's argv, wall time and max block here")
    args = ap.parse_args()
    extra = shlex.split(args.extra)
    rows, record = [], []
    for model in MODELS:
        for setup in SETUPS:
            r = None
            for host in (["--cpu-memory", ALST_HOST], []):
                argv, res, wall = run_max(model, setup, [*host, *extra])
                if r is None:
                    r = row(model, setup, res)
                else:
                    r.append(f"{res['max']['value']:,} ({res['max']['limited_by']})" if isinstance(res, dict)
                             else "nothing fits")
                record.append({"argv": argv, "wall_s": round(wall, 3),
                               "result": res if isinstance(res, str) else {
                                   "max": res["max"], "strategy": res["strategy"], "parallel": res["parallel"],
                                   "savers": savers(res), "cpu_memory_per_node_bytes": res["cpu_memory_per_node_bytes"]}})
                print(f"$ {shlex.join(argv)}  ({wall:.2f} s)", file=sys.stderr)
            rows.append(r)
    print(table(rows))
    print()
    print("Sources of the ALST column:")
    for (model, n), (pub, src) in PUBLISHED.items():
        print(f"- {model}, {n} GPU{'s' if n > 1 else ''}: {pub} — {src}")
    print(f"- recipes: {ALST_RECIPES}")
    print()
    print(f"python {platform.python_version()}, {platform.machine()}; command per row: "
          f"shardtrain plan --model MODEL --gpu {GPU} --nodes N --gpus-per-node G [--cpu-memory {ALST_HOST}]"
          f"{' ' + ' '.join(extra) if extra else ''} --max seq-len --json")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
