"""Reading the files a user hands the CLI (run YAML, DeepSpeed JSON, accelerate YAML, plan.json, HF
config.json) so that any bad file ends in ONE `ConfigError` naming the file and the fix, never another
exception: missing, a directory, a symlink loop, unreadable, over the size limit, binary / not UTF-8,
empty, invalid syntax, YAML tags (`!!python/...`: `yaml.safe_load` refuses them), nesting deeper than
`MAX_DEPTH` (PyYAML's composer and `json.loads` recurse per level: 5,000 levels is a RecursionError,
CPython's default limit is 1,000 frames), and non-finite floats (`json.loads` accepts NaN/Infinity,
YAML accepts .nan/.inf).

Callers re-raise ConfigError; `shardtrain.cli.main` prints it as `shardtrain: error: …`.
"""
from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path

import yaml

from shardtrain.config.schema import ConfigError

#: Config files are a few KiB; a larger file is a mistake (a checkpoint, a dataset) and reading it whole
#: would cost memory for nothing.
MAX_CONFIG_BYTES = 16 * 2**20
#: Deeper nesting is never a real config (the deepest we emit is 4) and PyYAML/json recurse per level.
MAX_DEPTH = 64


def _nesting_depth_exceeds(text: str, limit: int) -> bool:
    """Cheap scan before parsing: bracket depth ([{ in flow style / JSON) or indentation depth
    (block YAML, counted in indentation steps) above `limit`. Over-estimates are fine (a limit error
    on an absurd file), under-estimates are caught by the RecursionError guard."""
    depth = best = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            if depth > best:
                best = depth
                if best > limit:
                    return True
        elif ch in "]}":
            depth = max(0, depth - 1)
    indents = {len(line) - len(line.lstrip(" ")) for line in text.splitlines() if line.strip()}
    return len(indents) > limit


def read_text(path: str | os.PathLike, what: str, fix: str) -> str:
    """The file's text, or ConfigError("<what> '<path>': <problem>; <fix>")."""
    p = Path(path)
    head = f"{what} '{path}'"
    try:
        st = p.stat()  # follows symlinks: a loop is ELOOP here
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(f"{head}: a symlink loop; point it at a real file ({fix})") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise ConfigError(f"{head} does not exist; {fix}") from None
        raise ConfigError(f"{head}: cannot read ({e.strerror}); {fix}") from None
    if p.is_dir():
        raise ConfigError(f"{head} is a directory; give the file itself ({fix})")
    if not p.is_file():
        raise ConfigError(f"{head} is not a regular file; {fix}")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{head} is {st.st_size} bytes (over {MAX_CONFIG_BYTES // 2**20} MiB): not a config "
                          f"file; {fix}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{head}: cannot read ({e.strerror}); check its permissions (chmod u+r) — {fix}") from None
    if b"\x00" in data:
        raise ConfigError(f"{head} is a binary file (NUL bytes), not text; {fix}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{head} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          f"save it as UTF-8 — {fix}") from None
    return text.lstrip("\ufeff")


#: Values in a config after YAML aliases are expanded; more is an alias bomb ("billion laughs": 9 levels
#: of 9 aliases are 9^9 values that str() or a walk would expand), not a config.
MAX_VALUES = 100_000


def _check_finite(obj, head: str, path: str = "") -> None:
    """NaN/Infinity anywhere is refused: no config value means that, and they poison arithmetic.
    Also bounds the expanded size (MAX_VALUES)."""
    stack = [(obj, path)]
    seen = 0
    while stack:
        o, at = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(f"{head}: more than {MAX_VALUES} values once YAML aliases (*name) are expanded; "
                              "write the values out instead of nesting aliases")
        if isinstance(o, float) and not math.isfinite(o):
            raise ConfigError(f"{head}: {at or 'value'} is {o!r}; write a finite number")
        if isinstance(o, dict):
            stack.extend((v, f"{at}.{k}" if at else str(k)) for k, v in o.items())
        elif isinstance(o, list):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(o))


def parse_text(text: str, *, fmt: str, what: str, path: str | os.PathLike, fix: str, empty_ok: bool = False):
    """Parse YAML (`yaml.safe_load`) or JSON text from `path`; ConfigError on any problem."""
    head = f"{what} '{path}'"
    if not text.strip():
        if empty_ok:
            return None
        raise ConfigError(f"{head} is empty; {fix}")
    if _nesting_depth_exceeds(text, MAX_DEPTH):
        raise ConfigError(f"{head}: nested deeper than {MAX_DEPTH} levels, not a config file; {fix}")
    try:
        data = yaml.safe_load(text) if fmt == "yaml" else json.loads(text)
    except yaml.constructor.ConstructorError as e:
        tag = f" ({e.problem})" if getattr(e, "problem", None) else ""
        raise ConfigError(f"{head}: YAML tags are not allowed{tag}; write plain values — {fix}") from None
    except (yaml.YAMLError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        msg = " ".join(str(e).split())[:300]
        bad = "not valid YAML" if fmt == "yaml" else "invalid JSON"
        raise ConfigError(f"{head}: {bad}: {msg}; {fix}") from None
    except RecursionError:
        raise ConfigError(f"{head}: nested too deeply to parse; {fix}") from None
    _check_finite(data, head)
    return data


def load_file(path: str | os.PathLike, *, fmt: str, what: str, fix: str, empty_ok: bool = False):
    """read_text + parse_text. fmt: "yaml" | "json" | "auto" (by suffix: .json is JSON, else YAML)."""
    if fmt == "auto":
        fmt = "json" if str(path).lower().endswith(".json") else "yaml"
    return parse_text(read_text(path, what, fix), fmt=fmt, what=what, path=path, fix=fix, empty_ok=empty_ok)


def load_mapping(path: str | os.PathLike, *, fmt: str, what: str, fix: str, empty_ok: bool = False) -> dict:
    """Like load_file, and the top level must be a mapping (an empty file is {} when empty_ok)."""
    data = load_file(path, fmt=fmt, what=what, fix=fix, empty_ok=empty_ok)
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}': the top level must be a mapping (a JSON object), got {type(data).__name__}; {fix}")
    return data


# accelerate's ClusterConfig (accelerate/commands/config/config_args.py): these top-level keys hold
# mappings of scalars; every other key holds a scalar (or a list of scalars, e.g. gpu_ids as a list).
_ACCELERATE_BLOCKS = ("deepspeed_config", "fsdp_config", "megatron_lm_config", "dynamo_config", "ipex_config",
                      "mpirun_config", "fp8_config", "parallelism_config", "downcast_bf16_config")
_ACCELERATE_STR = ("distributed_type", "mixed_precision", "compute_environment", "deepspeed_config_file", "gpu_ids",
                   "zero3_init_flag", "offload_param_device", "offload_optimizer_device", "fsdp_auto_wrap_policy",
                   "fsdp_transformer_layer_cls_to_wrap")
_ACCELERATE_INT = ("num_processes", "num_machines", "machine_rank", "zero_stage", "fsdp_version")


def check_accelerate_shape(data: dict, path) -> None:
    """ConfigError unless the accelerate YAML has accelerate's shapes (so the linter can read it)."""
    fix = "compare it with the accelerate.yaml `shardtrain emit` writes"

    def scalar(v):
        return v is None or isinstance(v, (str, int, float, bool))

    def check_leaf(key, v):
        name = key.rsplit(".", 1)[-1]
        if not (scalar(v) or (isinstance(v, list) and all(scalar(x) for x in v))):
            raise ConfigError(f"accelerate config '{path}': {key} is a {type(v).__name__}, expected a value; {fix}")
        if name in _ACCELERATE_STR and v is not None and not isinstance(v, (str, bool)):
            raise ConfigError(f"accelerate config '{path}': {key}: {v!r} must be a string; {fix}")
        if name in _ACCELERATE_INT and v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(f"accelerate config '{path}': {key}: {v!r} must be an integer; {fix}")

    for k, v in data.items():
        if not isinstance(k, str):
            raise ConfigError(f"accelerate config '{path}': key {k!r} is not a string; {fix}")
        if k in _ACCELERATE_BLOCKS:
            if v is None:
                continue
            if not isinstance(v, dict):
                raise ConfigError(f"accelerate config '{path}': {k} must be a mapping, got {type(v).__name__}; {fix}")
            for k2, v2 in v.items():
                check_leaf(f"{k}.{k2}", v2)
        else:
            check_leaf(k, v)


def _umask() -> int:
    """The process umask: Linux shows it in /proc/self/status; elsewhere os.umask can only read it by
    setting it (set and restore at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same directory and a rename, with the mode an
    ordinary ``open(path, "w")`` would give (0666 & ~umask). tempfile.mkstemp creates its file 0600
    whatever the umask (the file is private until renamed), so without the chmod every run-dir file
    (plan.json, run.yaml, ds_config.json, command.txt) ended up unreadable to the group (issue 22)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
