"""What the INSTALLED DeepSpeed and accelerate accept, asked of them at run time (no hand-kept key lists).

DeepSpeed: the config is run through DeepSpeed's own parser (deepspeed/runtime/config.py
`DeepSpeedConfig`, whose blocks are pydantic `DeepSpeedConfigModel`s with `extra="forbid"`,
populate_by_name=True so field names and aliases both work, runtime/config_utils.py). Every dict in
the config is wrapped in a recording dict, so we learn which keys DeepSpeed read:
- the parser raises (pydantic ValidationError, assertion, DeepSpeedConfigError) -> it refuses to
  start: ERROR, at the key path pydantic reports (relative to the block it was given);
- a key never read in a block DeepSpeed inspected -> silently ignored: WARNING, with a rename
  suggestion only when it is a near miss of a key DeepSpeed did read there;
- `DeepSpeedConfigModel.__init__` drops "auto" values of a block's own fields (non-strict mode), so
  "auto" there means "DeepSpeed's default" (warning); "auto" in a block DeepSpeed does not validate
  (optimizer/scheduler params, gradient_clipping) reaches the optimizer/engine as a string (error).
accelerate: top-level keys are `ClusterConfig` fields (commands/config/config_args.py: from_yaml_file
raises on others); nested `deepspeed_config` / `fsdp_config` / ... keys are copied onto the launch
argparse namespace (commands/launch.py _validate_launch_command, `fsdp_` prefix added) and unknown ones
are silently ignored, so the known set is the launch parser's dests plus the `args.X` names
accelerate/utils/launch.py reads.
Imports of deepspeed/accelerate happen inside the functions: `shardtrain plan` never pays for them.
"""
from __future__ import annotations

import copy
import difflib
import logging
import os
import re
import types
from dataclasses import dataclass, field

from shardtrain.emit import deepspeed as K

AUTO = "auto"
NEAR_MISS = 0.8  # difflib ratio: "gradient_clip"~"gradient_clipping" 0.87; "comms_config"~"comms_logger" 0.67


def near_miss(key: str, known) -> str | None:
    hits = difflib.get_close_matches(str(key), sorted(str(k) for k in known), n=1, cutoff=NEAR_MISS)
    return hits[0] if hits else None


class _Rec(dict):
    """A dict that records which of its keys DeepSpeed reads. Overriding __iter__ makes `**d` take
    CPython's slow path (keys() + __getitem__), so a block handed to a pydantic model is seen."""

    def _note(self, key, probe=False):
        self.trace.read.setdefault(self.path, set()).add(key)
        self.trace.order.append((self.path, key))
        if not probe:  # a block is "inspected" once a value is fetched from it, not on `k in d` probes
            self.trace.inspected.add(self.path)
        return key

    def __getitem__(self, k):
        return super().__getitem__(self._note(k))

    def get(self, k, default=None):
        return super().get(self._note(k), default)

    def __contains__(self, k):
        return super().__contains__(self._note(k, probe=True))

    def pop(self, k, *default):
        return super().pop(self._note(k), *default)

    def setdefault(self, k, default=None):
        return super().setdefault(self._note(k), default)

    def __iter__(self):
        return super().__iter__()

    def keys(self):
        return _Keys(self)

    def items(self):  # copy.copy(top level) uses items(): only nested reads count
        if self.path:
            for k in super().keys():
                self._note(k)
        return super().items()


class _Keys:
    """d.keys(): `k in d.keys()` reads one key; iterating it (`**d`, `for k in d.keys()`) reads all."""

    def __init__(self, d: _Rec):
        self.d = d

    def __contains__(self, k):
        return k in self.d

    def __len__(self):
        return dict.__len__(self.d)

    def __iter__(self):
        t = self.d.trace
        t.consumed.append(self.d.path)
        t.consumed_all.add(self.d.path)
        keys = list(dict.keys(self.d))
        for k in keys:
            self.d._note(k)
        return iter(keys)


@dataclass
class _Trace:
    read: dict = field(default_factory=dict)       # path -> keys read
    consumed: list = field(default_factory=list)   # paths handed whole to a pydantic model (**d), this try
    consumed_all: set = field(default_factory=set)  # ... in any try
    inspected: set = field(default_factory=lambda: {()})  # blocks DeepSpeed fetched values from
    order: list = field(default_factory=list)


def _wrap(obj, trace: _Trace, path=()):
    if isinstance(obj, dict):
        r = _Rec({k: _wrap(v, trace, path + (k,)) for k, v in obj.items()})
        r.trace, r.path = trace, path
        return r
    if isinstance(obj, list):
        return [_wrap(v, trace, path + (i,)) for i, v in enumerate(obj)]
    return obj


@dataclass(frozen=True)
class RawFinding:
    severity: str
    path: tuple
    problem: str
    fix: str


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _delete(cfg: dict, path) -> bool:
    d = cfg
    for p in path[:-1]:
        if not isinstance(d, dict) or p not in d:
            return False
        d = d[p]
    if isinstance(d, dict) and path and path[-1] in d:
        del d[path[-1]]
        return True
    return False


def _is_batch_failure(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("_batch_assertion", "_set_batch_related_parameters"):
            return True
        tb = tb.tb_next
    return False


def deepspeed_findings(cfg: dict, *, world_size: int = 1):
    """Run DeepSpeed's parser on `cfg` until it accepts what is left; returns (findings, trace).
    Batch arithmetic is left to the caller (it knows the world size; DeepSpeed asserts equality)."""
    import deepspeed.runtime.config as dsc
    from pydantic import ValidationError
    work = copy.deepcopy(cfg)
    trace = _Trace()
    out: list[RawFinding] = []
    removed: set = set()
    world = world_size
    ds_logger = logging.getLogger("DeepSpeed")
    old_level, old_dist = ds_logger.level, dsc.dist
    ds_logger.setLevel(logging.ERROR)
    try:
        for _ in range(50):
            dsc.dist = types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: world)
            trace.consumed.clear()
            n_read = len(trace.order)
            try:
                dsc.DeepSpeedConfig(_wrap(work, trace))
                break
            except ValidationError as e:
                # pydantic's locations are relative to the block the model was built from: the last
                # dict unpacked with ** (get_zero_config -> DeepSpeedZeroConfig(**zero_dict), ...)
                prefix = trace.consumed[-1] if trace.consumed else ()
                progressed = False
                for err in e.errors():
                    loc = prefix + tuple(err["loc"])
                    out.append(_pydantic_finding(err, loc, e.title))
                    removed.add(loc)
                    progressed |= _delete(work, loc) or _delete(work, loc[:-1])
                if not progressed:
                    removed.add(prefix)
                    if not _delete(work, prefix):
                        break
            except Exception as e:  # noqa: BLE001 - whatever DeepSpeed raises at start-up
                if _is_batch_failure(e):  # the caller judges the batch arithmetic (it knows the world size)
                    for k in K.batch_sizes(work):
                        work[k] = 1
                    world = 1
                    continue
                named = [k for k in work if re.search(rf"\b{re.escape(str(k))}\b", str(e))]
                if not named:
                    named = [k for p, k in trace.order[n_read:] if p == () and k in work][-1:]
                if not named:
                    out.append(RawFinding("error", (), f"DeepSpeed refuses the config: {e}", "fix the file"))
                    break
                for k in named:
                    why = str(e).strip().rstrip(".")
                    out.append(RawFinding("error", (k,), f"DeepSpeed refuses it at start-up: {why}",
                                          "fix or delete it"))
                    removed.add((k,))
                    del work[k]
    finally:
        dsc.dist = old_dist
        ds_logger.setLevel(old_level)
    out += _ignored(cfg, trace, removed)
    return out, trace


def _pydantic_finding(err: dict, loc: tuple, model: str) -> RawFinding:
    if err["type"] == "extra_forbidden":
        model, known = _model_keys(model, loc)
        hit = near_miss(loc[-1], known) if known else None
        fix = f"rename it to '{hit}'" if hit else (f"delete it (this block takes: {', '.join(sorted(known))})"
                                                   if known else "delete it")
        return RawFinding("error", loc, f"not a field of DeepSpeed's {model} (it refuses to start: extra keys "
                          "are forbidden)", fix)
    return RawFinding("error", loc, f"DeepSpeed's {model} rejects {err.get('input')!r}: {err['msg']}",
                      "write a value of the expected type")


def _model_keys(model_name: str, loc: tuple) -> tuple[str, set]:
    """(name, field names and aliases) of the pydantic model (or nested model) holding `loc`'s key."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    cls = next((c for c in _subclasses(DeepSpeedConfigModel) if c.__name__ == model_name), None)
    if cls is None:
        return model_name, set()
    # walk nested model fields along loc (e.g. zero_optimization.offload_param.<key>)
    for part in loc[:-1]:
        f = _field(cls, part)
        sub = getattr(f.annotation, "__args__", (f.annotation,)) if f else ()
        nxt = next((a for a in sub if isinstance(a, type) and issubclass(a, DeepSpeedConfigModel)), None)
        if nxt is not None:
            cls = nxt
    return cls.__name__, {k for n, f in cls.model_fields.items() for k in (n, f.alias) if k}


def _field(cls, key):
    for n, f in cls.model_fields.items():
        if key in (n, f.alias):
            return f
    return None


def _subclasses(c):
    for s in c.__subclasses__():
        yield s
        yield from _subclasses(s)


def _ignored(cfg: dict, trace: _Trace, removed: set) -> list[RawFinding]:
    """Keys DeepSpeed never read in a block it inspected (and did not hand whole to a model)."""
    out = []

    def walk(d, path):
        read = trace.read.get(path)
        if read is None or path not in trace.inspected:  # never looked into, or handed on whole
            return
        for k, v in d.items():
            p = path + (k,)
            if any(p[:len(r)] == r for r in removed if r):
                continue
            if k not in read:
                hit = near_miss(k, read)
                out.append(RawFinding("warning", p, "DeepSpeed never reads this key (it is silently ignored)",
                                      f"rename it to '{hit}'" if hit else "delete it, or move it where DeepSpeed "
                                      "reads it"))
            elif isinstance(v, dict):
                walk(v, p)
    walk(cfg, ())
    return out


def auto_in_validated_block(trace: _Trace, path: tuple) -> bool:
    """True when DeepSpeed handed the block holding `path` to a DeepSpeedConfigModel, which drops
    "auto" values of its own fields (config_utils.py, non-strict __init__) and uses the default."""
    return path[:-1] in trace.consumed_all


# ------------------------------------------------------------------------------------------- accelerate
def accelerate_top_keys() -> set:
    from accelerate.commands.config.config_args import ClusterConfig
    return set(ClusterConfig.__dataclass_fields__) | {"fp16", "dynamo_backend"}  # process_config converts these


_PREFIX = {"fsdp_config": "fsdp_", "fp8_config": "fp8_", "dynamo_config": "dynamo_"}


def accelerate_block_keys(block: str) -> tuple[str, set]:
    """(prefix accelerate adds, known keys after the prefix) for a nested block of the YAML."""
    from accelerate.commands import launch as L
    from accelerate.utils import launch as UL
    dests = {a.dest for a in L.launch_command_parser()._actions}
    src = open(UL.__file__, encoding="utf-8").read() + open(L.__file__, encoding="utf-8").read()
    dests |= set(re.findall(r"\bargs\.(\w+)", src)) | set(re.findall(r"getattr\(args, \"(\w+)\"", src))
    return _PREFIX.get(block, ""), dests


def accelerate_parallelism_config(kwargs: dict):
    """accelerate's own ParallelismConfig(**kwargs) (accelerate/parallelism_config.py: its __post_init__
    validates the sizes and backends), blind to any PARALLELISM_CONFIG_* variables of this shell (it reads
    them for unset fields). Raises what accelerate raises (ValueError), ImportError without accelerate."""
    from unittest import mock

    from accelerate.parallelism_config import ParallelismConfig
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARALLELISM_CONFIG_")}
    with mock.patch.dict(os.environ, env, clear=True):
        return ParallelismConfig(**kwargs)


# ------------------------------------------------------------------------------------------- HF Trainer
def trainer_fills() -> dict[str, str]:
    """{dotted DeepSpeed key: TrainingArguments source} for every key the installed transformers'
    HfTrainerDeepSpeedConfig fills when its value is "auto" (transformers/integrations/deepspeed.py,
    trainer_config_process / trainer_config_finalize: fill_match / fill_only calls), read from its
    source so a new transformers needs no edit here. {} when transformers is not installed."""
    import importlib.util
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = f"{list(spec.submodule_search_locations)[0]}/integrations/deepspeed.py"
    try:
        src = open(path, encoding="utf-8").read()
    except OSError:
        return {}
    out = {}
    for kind, key, rest in re.findall(r'fill_(match|only)\(\s*"([\w.]+)"\s*,(.*?)\)[ \t]*(?:#[^\n]*)?\n', src, re.S):
        names = re.findall(r'"([^"]+)"', rest)
        out[key] = (f"TrainingArguments {names[-1]}" if kind == "match" and names
                    else "the model config (hidden_size)" if "hidden_size" in rest else "a fixed value")
    return out


def accelerate_launch_errors(cfg: dict) -> list[RawFinding]:
    """What `accelerate launch` itself refuses for this YAML: its launch parser reads the file
    (commands/launch.py _validate_launch_command), builds the workers' environment
    (utils/launch.py prepare_multi_gpu_env) and, for FSDP, the workers' FullyShardedDataParallelPlugin
    is constructed from that environment (utils/dataclasses.py __post_init__) — each step's exception
    is an error. Runs on the CPU: nothing is launched."""
    import tempfile

    import yaml
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    old_env = dict(os.environ)
    try:
        args = launch_command_parser().parse_args(["--config_file", f.name, "train.py"])
        _validate_launch_command(args)
        if cfg.get("distributed_type") != "FSDP":
            return []
        os.environ.update(prepare_multi_gpu_env(args))
        from accelerate.utils.dataclasses import FullyShardedDataParallelPlugin
        FullyShardedDataParallelPlugin()
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        where = ("fsdp_config",) if cfg.get("distributed_type") == "FSDP" and isinstance(cfg.get("fsdp_config"), dict) \
            else ()
        return [RawFinding("error", where, f"accelerate refuses it at launch: {' '.join(str(e).split())}",
                           "fix the value accelerate names (see `accelerate launch --help`)")]
    finally:
        os.environ.clear()
        os.environ.update(old_env)
        os.unlink(f.name)
    return []
