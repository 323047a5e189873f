"""Plan vs published GPU measurements (issue 19 points 1 and 3): every row of benchmarks/published/*.yaml.

    python benchmarks/published.py            # the table, the misses and the summary
    python benchmarks/published.py --json     # one JSON object (what tests/test_published.py reads)
    python benchmarks/published.py --only ID,ID --terms   # chosen rows, with the plan's terms at the peak
    python benchmarks/published.py --floor    # today's errors as tests/test_published.py's FLOOR

Each YAML file is one measured run that someone else published (torchtune, torchtitan, the PEFT docs,
Answer.AI, a Hugging Face blog notebook): `source` (url, commit/date, where, the quoted row), `hardware`,
`setup` (the full setup as the source states it; `unknown` where it does not), `metric` (allocated | active
| reserved | nvidia-smi | unknown), `published.peak_memory` ("7.4 GiB", a range "72-80 GiB", or unknown for
a time-only row) and `published.tokens_per_s_per_gpu` (or unknown; a row has at least one of the two), and
`shardtrain`: `config` (the run config the setup maps to: keys of config/schema.py), optional `fallback`
(merged over `config` when this checkout refuses a key, e.g. a checkpointing policy it cannot yet spell)
and `missing` (what of the setup the plan cannot express; such rows are planned as near as the config
allows and stay in the denominator).

The plan comes from the same pipeline as `shardtrain plan` (config/pipeline.py load + plan_for, in-process;
a forced strategy that does not fit still gives its numbers). Like is compared with like, by the plan's
allocator model (compiler/allocator.py):
  allocated / active / unknown  -> peak_allocated_bytes (what max_memory_allocated counts; an `unknown`
                                   row is set beside the smallest figure, so an under-estimate shows,
                                   unless it names `metric_assumed` and why: then `~kind` in the table)
  reserved                      -> peak_reserved_bytes (max_memory_reserved)
  nvidia-smi                    -> nvidia_smi_bytes (reserved + CUDA context and library buffers)
The column `vs` says which (`total` = peak + cuda_context, for plans without the allocator figures).
`fits` is the plan's verdict on the published hardware: every row ran, so NO is a false "does not fit".
Memory error = plan / published - 1 (0 inside a published range; an under-estimate is negative).
Time error = plan step time / measured step time - 1, from tokens/s per GPU:
plan tokens/s per GPU = global batch x seq len / (estimated_step_time_s x GPUs).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TABLE_DIR = ROOT / "benchmarks" / "published"
METRICS = ("allocated", "active", "reserved", "nvidia-smi", "unknown")
_UNITS = {"GiB": 2**30, "GB": 10**9, "MiB": 2**20, "MB": 10**6}
GiB = 2**30


class TableError(ValueError):
    """A row file that cannot be read: the message names the file and the key."""


@dataclass(frozen=True)
class Row:
    id: str
    path: Path
    project: str
    url: str
    quote: str
    metric: str
    """What the source says it reported (METRICS; unknown when it does not say)."""
    metric_assumed: str | None
    """For an unknown metric: the kind the row is compared as, with its reason in the file (metric_assumed_why)."""
    peak_lo: int | None
    """Published peak bytes (low end of a range; equal to peak_hi for one figure; None: a time-only row)."""
    peak_hi: int | None
    tokens_per_s_per_gpu: float | None
    config: dict
    fallback: dict | None
    missing: tuple[str, ...]
    setup: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    row: Row
    plan_bytes: int
    """The plan's figure compared with the published one (see `basis`)."""
    basis: str
    mem_err: float | None
    """None for a time-only row (the source publishes no memory figure)."""
    time_err: float | None
    plan_tokens_per_s_per_gpu: float
    strategy: str
    fits: bool
    refused: tuple[str, ...]
    """Config values this checkout refused (the fallback was planned instead)."""
    plan: dict = field(default_factory=dict, repr=False, compare=False)
    """The plan JSON (for --terms)."""

    @property
    def missing(self) -> tuple[str, ...]:
        return self.refused + self.row.missing


def parse_bytes(text: str, where: str) -> tuple[int, int]:
    """'7.4 GiB' -> (b, b); '72-80 GiB' -> (lo, hi). The unit is required (GB and GiB differ by 7%)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(?:-\s*([\d.]+))?\s*(GiB|GB|MiB|MB)\s*", str(text))
    if not m:
        raise TableError(f"{where}: peak_memory {text!r} is not '<number> GiB|GB|MiB|MB' or '<lo>-<hi> GiB'; "
                         "write the figure with the unit the source prints")
    unit = _UNITS[m.group(3)]
    lo = float(m.group(1)) * unit
    hi = float(m.group(2)) * unit if m.group(2) else lo
    return int(lo), int(hi)


def _need(d: dict, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        raise TableError(f"{where}: missing key '{key}'; every row needs source, hardware, setup, metric, "
                         "published and shardtrain (see benchmarks/published.py)")
    return d[key]


def load_row(path: Path) -> Row:
    import yaml
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TableError(f"{path.name}: not valid YAML ({str(e).splitlines()[0]})") from None
    where = path.name
    for key in ("id", "source", "hardware", "setup", "metric", "published", "shardtrain"):
        _need(d, key, where)
    if d["id"] != path.stem:
        raise TableError(f"{where}: id {d['id']!r} differs from the file name; rename one of them")
    metric = d["metric"]
    if metric not in METRICS:
        raise TableError(f"{where}: metric {metric!r} is not one of {', '.join(METRICS)}")
    assumed = d.get("metric_assumed")
    if assumed is not None and (metric != "unknown" or assumed not in METRICS[:-1] or not d.get("metric_assumed_why")):
        raise TableError(f"{where}: metric_assumed {assumed!r} needs metric: unknown, a value among "
                         f"{', '.join(METRICS[:-1])} and a metric_assumed_why")
    src, pub, st = d["source"], d["published"], d["shardtrain"]
    peak = _need(pub, "peak_memory", where + " published")
    lo, hi = (None, None) if peak == "unknown" else parse_bytes(peak, where)
    if lo is None and pub.get("tokens_per_s_per_gpu", "unknown") == "unknown":
        raise TableError(f"{where}: published has neither peak_memory nor tokens_per_s_per_gpu; a row needs one")
    tps = pub.get("tokens_per_s_per_gpu", "unknown")
    if tps != "unknown" and not isinstance(tps, (int, float)):
        raise TableError(f"{where}: published.tokens_per_s_per_gpu {tps!r} is not a number or unknown")
    return Row(id=d["id"], path=path, project=_need(src, "project", where + " source"),
               url=_need(src, "url", where + " source"), quote=_need(src, "quote", where + " source"),
               metric=metric, metric_assumed=assumed, peak_lo=lo, peak_hi=hi,
               tokens_per_s_per_gpu=None if tps == "unknown" else float(tps),
               config=_need(st, "config", where + " shardtrain"), fallback=st.get("fallback"),
               missing=tuple(st.get("missing") or ()), setup=d["setup"])


def load_table(directory: Path = TABLE_DIR) -> list[Row]:
    return [load_row(p) for p in sorted(directory.glob("*.yaml"))]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _with_paths(config: dict) -> dict:
    """Model config.json paths in the table are relative to the repository root."""
    c = copy.deepcopy(config)
    name = c.get("model", {}).get("name", "")
    if isinstance(name, str) and name.startswith("benchmarks/"):
        c["model"]["name"] = str(ROOT / name)
    return c


def plan_json(config: dict) -> dict:
    """`shardtrain plan --json` of a run-config mapping, in-process; a forced strategy that does not fit
    still gives its plan (NoFitError carries it)."""
    from shardtrain.compiler.planner import NoFitError
    from shardtrain.config import pipeline
    cfg = pipeline.load(_with_paths(config))
    try:
        return pipeline.plan_for(cfg, advise=False).to_json()
    except NoFitError as e:
        return e.plan.to_json()


def plan_row(row: Row) -> tuple[dict, tuple[str, ...]]:
    """The plan of a row: its config, or its fallback when this checkout refuses a value of the config."""
    from shardtrain.config.schema import ConfigError
    try:
        return plan_json(row.config), ()
    except ConfigError as e:
        if not row.fallback:
            raise TableError(f"{row.path.name}: the config is refused ({e}) and the row has no shardtrain.fallback")
        return plan_json(_merge(row.config, row.fallback)), (f"refused by this checkout: {e}",)


def compared_figure(d: dict, metric: str) -> tuple[int, str]:
    """(plan bytes, basis) to set beside a published figure of this metric: the allocator model's figures
    (compiler/allocator.py: plan JSON peak_allocated_bytes / peak_reserved_bytes / nvidia_smi_bytes); a plan
    without them (older checkouts) falls back to the per-GPU terms."""
    per = d["per_gpu"]
    ctx = int(per.get("cuda_context", 0))
    if metric in ("allocated", "active", "unknown"):
        if "peak_allocated_bytes" in d:
            return int(d["peak_allocated_bytes"]), "allocated"
        return int(per["total"]) - ctx, "allocated"
    key, basis = ("peak_reserved_bytes", "reserved") if metric == "reserved" else ("nvidia_smi_bytes", "nvidia-smi")
    if key in d:
        return int(d[key]), basis
    return int(per["total"]), "total"  # no allocator model: peak + cuda_context


def mem_error(plan: int, lo: int, hi: int) -> float:
    if lo <= plan <= hi:
        return 0.0
    return plan / hi - 1 if plan > hi else plan / lo - 1


def evaluate(row: Row) -> Result:
    d, refused = plan_row(row)
    plan_b, basis = compared_figure(d, row.metric_assumed or row.metric)
    gpus = int(d["world_size"])
    tokens_per_step = int(d["global_batch_size"]) * int(d["seq_len"])
    step_s = float(d["estimated_step_time_s"])
    plan_tps = tokens_per_step / (step_s * gpus) if step_s > 0 else float("inf")
    time_err = (row.tokens_per_s_per_gpu / plan_tps - 1) if row.tokens_per_s_per_gpu else None
    mem_err = None if row.peak_lo is None else mem_error(plan_b, row.peak_lo, row.peak_hi)
    return Result(row=row, plan_bytes=plan_b, basis=basis, mem_err=mem_err,
                  time_err=time_err, plan_tokens_per_s_per_gpu=plan_tps, strategy=d["strategy"], fits=bool(d["fits"]),
                  refused=refused, plan=d)


def summarize(results: list[Result]) -> dict:
    mem_rows = [r for r in results if r.mem_err is not None]
    mem = [abs(r.mem_err) for r in mem_rows]
    times = [abs(r.time_err) for r in results if r.time_err is not None]
    return {"rows": len(results), "sources": len({r.row.project for r in results}), "mem_rows": len(mem),
            "mem_median_abs_err": statistics.median(mem), "mem_worst_abs_err": max(mem),
            "mem_within_10pct": sum(e <= 0.10 for e in mem),
            "mem_under_estimates": sum(r.mem_err < 0 for r in mem_rows),
            "time_rows": len(times), "time_median_abs_err": statistics.median(times) if times else None,
            "time_worst_abs_err": max(times) if times else None, "time_within_25pct": sum(e <= 0.25 for e in times),
            "expressible_rows": sum(not r.missing for r in results),
            "ran_but_plan_says_no_fit": sum(not r.fits for r in results)}


def _gib(b: float) -> str:
    return f"{b / GiB:6.1f}"


def render(results: list[Result], only: tuple[str, ...] = ()) -> str:
    """The table (rows named in `only`, or all), the summary over ALL rows, and what each shown row misses."""
    head = (f"{'row':52} {'metric':10} {'pub GiB':>11} {'plan GiB':>8} {'vs':12} {'mem err':>8} "
            f"{'pub tok/s':>9} {'plan tok/s':>10} {'time err':>8} {'fits':>4}  missing")
    lines = [head, "-" * len(head)]
    shown = [r for r in results if not only or r.row.id in only]
    for r in shown:
        pub = "-" if r.row.peak_lo is None else _gib(r.row.peak_lo) if r.row.peak_lo == r.row.peak_hi else \
            f"{r.row.peak_lo / GiB:.1f}-{r.row.peak_hi / GiB:.1f}"
        merr = f"{'-':>8}" if r.mem_err is None else f"{r.mem_err:+8.1%}"
        tps = f"{r.row.tokens_per_s_per_gpu:9.0f}" if r.row.tokens_per_s_per_gpu else f"{'-':>9}"
        terr = f"{r.time_err:+8.1%}" if r.time_err is not None else f"{'-':>8}"
        metric = f"~{r.row.metric_assumed}" if r.row.metric_assumed else r.row.metric
        lines.append(f"{r.row.id:52} {metric:10} {pub:>11} {_gib(r.plan_bytes):>8} {r.basis:12} "
                     f"{merr} {tps} {r.plan_tokens_per_s_per_gpu:10.0f} {terr} "
                     f"{'yes' if r.fits else 'NO':>4}  {len(r.missing)}")
    s = summarize(results)
    lines += ["", (f"({len(shown)} of {s['rows']} rows shown; the summary is over all of them)\n" if only else "")
              + f"{s['rows']} rows from {s['sources']} sources; {s['expressible_rows']} fully expressible",
              f"memory: median |err| {s['mem_median_abs_err']:.1%}, worst {s['mem_worst_abs_err']:.1%}, "
              f"{s['mem_within_10pct']}/{s['mem_rows']} within 10%, {s['mem_under_estimates']} under-estimates "
              "(bar: all within 10%, median <= 5%)",
              f"fit:    the plan says DOES NOT FIT for {s['ran_but_plan_says_no_fit']} of these {s['rows']} runs "
              "that ran"]
    if s["time_rows"]:
        lines.append(f"time:   median |err| {s['time_median_abs_err']:.1%}, worst {s['time_worst_abs_err']:.1%}, "
                     f"{s['time_within_25pct']}/{s['time_rows']} within 25% (bar: all within 25%, median <= 15%)")
    lines += ["", "what each row cannot express yet (planned as near as the config allows):"]
    for r in shown:
        for m in r.missing:
            lines.append(f"  {r.row.id}: {m}")
    return "\n".join(lines)


def render_terms(results: list[Result], only: tuple[str, ...] = ()) -> str:
    """Per shown row: the plan's terms at its peak phase (GiB) and its three figures beside the published one,
    to find which term a miss comes from."""
    lines = []
    for r in (x for x in results if not only or x.row.id in only):
        d = r.plan
        terms = " ".join(f"{k}={v / GiB:.2f}" for k, v in d["per_gpu"].items() if v and k != "total")
        figures = " ".join(f"{name}={d[key] / GiB:.2f}" for name, key in
                           (("allocated", "peak_allocated_bytes"), ("reserved", "peak_reserved_bytes"),
                            ("nvidia-smi", "nvidia_smi_bytes")) if key in d)
        pub = "unknown" if r.row.peak_lo is None else f"{r.row.peak_lo / GiB:.2f}" + (
            f"-{r.row.peak_hi / GiB:.2f}" if r.row.peak_hi != r.row.peak_lo else "")
        lines += [f"{r.row.id}: published {pub} GiB ({r.row.metric}); plan {d['strategy']}, micro batch "
                  f"{d['micro_batch_size']}, checkpointing {d['gradient_checkpointing']}, loss {d['loss']}, "
                  f"peak in {d.get('peak_phase') or '?'}",
                  f"    at the peak (GiB): {terms}", f"    plan figures (GiB): {figures}"]
    return "\n".join(lines)


def to_json(results: list[Result]) -> dict:
    return {"summary": summarize(results),
            "rows": [{"id": r.row.id, "project": r.row.project, "metric": r.row.metric,
                      "metric_assumed": r.row.metric_assumed, "basis": r.basis,
                      "published_bytes": [r.row.peak_lo, r.row.peak_hi], "plan_bytes": r.plan_bytes,
                      "mem_err": None if r.mem_err is None else round(r.mem_err, 4),
                      "time_err": None if r.time_err is None else round(r.time_err, 4),
                      "published_tokens_per_s_per_gpu": r.row.tokens_per_s_per_gpu,
                      "plan_tokens_per_s_per_gpu": round(r.plan_tokens_per_s_per_gpu, 1), "strategy": r.strategy,
                      "fits": r.fits, "missing": list(r.missing)} for r in results]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--floor", action="store_true",
                    help="print the FLOOR mapping of tests/test_published.py for today's errors (to paste there when a "
                         "modelling change moves a row, with the reason in the commit)")
    ap.add_argument("--terms", action="store_true", help="also print each shown row's plan terms at its peak")
    ap.add_argument("--only", default="", help="comma-separated row ids to show (the summary stays over all rows)")
    ap.add_argument("--dir", type=Path, default=TABLE_DIR, help="directory of row files (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        results = [evaluate(r) for r in load_table(args.dir)]
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    only = tuple(i for i in args.only.split(",") if i)
    unknown = sorted(set(only) - {r.row.id for r in results})
    if unknown:
        print(f"error: --only: no row {', '.join(unknown)} in {args.dir}; the ids are the file names without .yaml",
              file=sys.stderr)
        return 2
    if args.floor:
        fmt = lambda e: "None" if e is None else f"{e:+.3f}"  # noqa: E731
        print("FLOOR = {\n" + "\n".join(f'    "{r.row.id}": ({fmt(r.mem_err)}, {fmt(r.time_err)}),'
                                         for r in results) + "\n}")
        return 0
    print(json.dumps(to_json(results), indent=1) if args.json else render(results, only))
    if args.terms and not args.json:
        print("\n" + render_terms(results, only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
