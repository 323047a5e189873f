"""The run directory format: every file name in it, the checkpoint layout and the metrics.jsonl records.

The one definition that the launcher (writes the run files, reads the metrics for its summary and for
resume), the runtime (reads the run files, writes metrics, checkpoints and memory reports) and
`shardtrain report` use. Pure: names, paths and a tolerant metrics reader; no torch, no yaml, and no
import of ``shardtrain.launcher`` / ``shardtrain.config`` (the runtime imports it on every rank).

Layout (``<run.output_dir>/<run.name or config stem>/`` unless ``--run-dir`` says otherwise)::

    run.yaml          the resolved run config (RunConfig.to_dict(): every key, flags applied)
    plan.json         the full Plan (Plan.to_json(), including "spec"; Plan.from_json reads it)
    ds_config.json    DeepSpeed config (only for DeepSpeed strategies; shardtrain.emit.deepspeed)
    fsdp.json         FSDP2 settings (only for FSDP strategies; shardtrain.emit.fsdp)
    command.txt       the exact launcher command and environment, as a runnable bash script
    logs/             one folder per launch (launcher.log and per-rank stdout/stderr), plus the workers'
                      worker_rank{R}.log and memory_table.txt
    checkpoints/      step_N/ (state/: the portable model + optimizer state, trainer_state.json, rng_rank{R}.pt,
                      MANIFEST.json, COMPLETE written last), .tmp_step_N/ while being written,
                      and the `latest` pointer ("step_N"); see shardtrain/runtime/ckpt_files.py
    metrics.jsonl     rank 0: one JSON object per line, "kind": "train" (one per optimizer step) | "eval"
    memory_rank{R}.json, final/, oom/rank{R}.json   written by the workers
    previous/<time>/  the state --no-resume moved aside
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

# ---------------------------------------------------------------- run files (written by the launcher)
RUN_YAML = "run.yaml"
PLAN_JSON = "plan.json"
DS_CONFIG_JSON = "ds_config.json"
FSDP_JSON = "fsdp.json"
COMMAND_TXT = "command.txt"
#: Everything the launcher writes before a launch (a stale one from an earlier strategy is removed).
RUN_FILES = (RUN_YAML, PLAN_JSON, DS_CONFIG_JSON, FSDP_JSON, COMMAND_TXT)


def config_text(cfg: dict) -> str:
    """run.yaml's text for RunConfig.to_dict() (keys in the schema's order)."""
    import yaml  # only the writers need it
    return yaml.safe_dump(cfg, sort_keys=False)


def json_text(obj: dict) -> str:
    """The run dir's JSON files (plan.json: Plan.to_json(); the engine configs): indented, newline-ended."""
    return json.dumps(obj, indent=2) + "\n"


# ---------------------------------------------------------------- what the workers write
METRICS_JSONL = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
FINAL = "final"
#: run.export: both: the merged full weights, under final/ (the adapter stays in final/ itself).
FINAL_MERGED = "merged"
LOGS = "logs"
PREVIOUS = "previous"
MEMORY_RANK_GLOB = "memory_rank*.json"
MEMORY_TABLE = "memory_table.txt"
#: The launcher's own output, in each launch's folder under logs/.
LAUNCHER_LOG = "launcher.log"
#: In each launch's folder under logs/, under --max-restarts: the exit code (and step) of workers that
#: stopped deliberately (pre-empted, non-finite steps) and exited 0 so torchrun would not restart them
#: (exitcodes.STOP_MARKER_ENV, launcher/restart.py).
STOP_MARKER = "stopped"
#: "Training state": what --no-resume moves aside and what a config change protects.
STATE_ENTRIES = (CHECKPOINTS, METRICS_JSONL, FINAL, LOGS)


def memory_rank_name(rank: int) -> str:
    return f"memory_rank{rank}.json"


def worker_log_name(rank: int) -> str:
    return f"worker_rank{rank}.log"


#: ``plans/world{W}.json``: `launch --min-nodes M` compiles the plan again for every smaller world the job
#: may shrink to (M..N-1 nodes) before it starts; a worker that torchrun's elastic agent restarts on fewer
#: ranks takes the plan for its world size (runtime/build.py) and resumes from the portable checkpoint.
ELASTIC_PLANS_DIR = "plans"


def elastic_plan_name(world_size: int) -> str:
    return f"world{world_size}.json"


#: ``oom/rank{R}.json``: a worker's out-of-memory record (runtime/faults.py) for `launch --on-oom replan`.
OOM_DIR = "oom"
OOM_RECORD_GLOB = "rank*.json"


def oom_record_name(rank: int) -> str:
    return f"rank{rank}.json"


# ---------------------------------------------------------------- checkpoints/ (shardtrain/runtime/ckpt_files.py)
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
#: MANIFEST.json keys: "files" {relative path: size in bytes}; "digest_algorithm" ("xxh3_64");
#: "digests" {relative path: hex digest of the file's bytes, taken while writing}; "hashed_after_write"
#: [relative paths whose digest was computed by reading the file back]. Issue 21; older manifests hold
#: "files" only (sizes are then all a resume can check).
MANIFEST_FILES = "files"
MANIFEST_ALGORITHM = "digest_algorithm"
MANIFEST_DIGESTS = "digests"
MANIFEST_REHASHED = "hashed_after_write"
#: Inside .tmp_step_N/ while it is written: each rank's {relative path: [size, digest]} of the files it
#: wrote (merged into MANIFEST.json by rank 0, then removed).
DIGESTS_DIR = ".digests"
#: The portable checkpoint (shardtrain/runtime/portable.py): a torch.distributed.checkpoint directory in
#: every step_N/ that DDP, FSDP2 and ZeRO-1/2/3 all read and write, on any number of ranks; its keys are
#: ``model.<fqn>`` (fp32 master parameters) and ``optim.state.<fqn>.<name>`` (exp_avg, exp_avg_sq, step).
CKPT_STATE_DIR = "state"
CKPT_MODEL_PREFIX = "model."
CKPT_OPTIM_PREFIX = "optim."


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def step_of(d: Path) -> int | None:
    """N for a directory named step_N, else None."""
    name = Path(d).name
    if not name.startswith(STEP_PREFIX):
        return None
    try:
        return int(name[len(STEP_PREFIX):])
    except ValueError:
        return None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / step_dir_name(step)


# ---------------------------------------------------------------- metrics.jsonl records
KIND = "kind"
TRAIN = "train"
EVAL = "eval"
STEP = "step"
LOSS = "loss"
MEMORY = "memory"
UNIX_TIME = "unix_time_s"
"""When the step's record was made (time.time() after the step's last collective): the period
between consecutive records is the loop's whole step, between-step work included."""
NONFINITE_STEPS = "nonfinite_steps"
"""Steps of this run so far whose loss or gradient norm was not finite and so made no optimizer update
(issue 21: runtime/guard.py); carried across resumes in trainer_state.json under the same key."""
STEP_SKIPPED = "skipped"
"""True on the record of a step that made no optimizer update (non-finite loss or gradient norm)."""


def iter_metrics(path: Path) -> Iterator[dict]:
    """The records of a metrics.jsonl file, in order. A line that is not a JSON object (cut by a kill,
    damaged: issue 13) is skipped; a missing or unreadable file has no records."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(rec, dict):
            yield rec


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of ``<run_dir>/metrics.jsonl`` (see :func:`iter_metrics`)."""
    return list(iter_metrics(Path(run_dir) / METRICS_JSONL))


def is_train(rec: dict) -> bool:
    """A training-step record (records written before "kind" existed count as training)."""
    return rec.get(KIND, rec.get("type", TRAIN)) == TRAIN


def completed_steps(run_dir: Path) -> int:
    """The last optimizer step recorded in metrics.jsonl (0 when none)."""
    steps = [r[STEP] for r in read_metrics(run_dir) if is_train(r) and isinstance(r.get(STEP), int)]
    return max(steps, default=0)
