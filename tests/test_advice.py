"""Issue 22: "to fit, try" advice is verified by re-planning. Every printed suggestion, applied with
``--set`` through the real CLI, fits; cheapest first; pairs when no single change fits; `plan --json`
carries them; host RAM the user did not give is marked as assumed; the small text bugs."""
from __future__ import annotations

import ast
import json
import re
import shlex
import time
from pathlib import Path

import pytest
import yaml

from shardtrain.cli import main
from shardtrain.compiler import advice
from shardtrain.compiler.plan import ChangeKind, Plan
from shardtrain.compiler.planner import NoFitError
from shardtrain.config import pipeline
from shardtrain.config.flags import PLAN_FLAGS
from shardtrain.exitcodes import EXIT_NO_FIT, EXIT_OK

TiB = 2**40
# the two no-fit cases of the issue (measured 2026-12-05)
FULL_70B_8xH100 = ["--model", "llama-3.1-70b", "--gpus-per-node", "8", "--gpu", "h100", "--method", "full"]
# This round (issue 19/20) made 70B QLoRA on one 48 GiB GPU fit by default: fsdp_offload keeps the NF4 shards
# in host RAM (23.8 GiB per GPU), headroom is 0 under the allocator model, and loss / checkpoint offload / tiled
# MLP are auto. The scenario the advice tests mean (a user who pinned a strategy that keeps the model on the
# GPU, the full loss and no long-context savers) is pinned explicitly; then it needs ~52.5 GiB > 48.0 GiB.
QLORA_70B_1x48GB = ["--model", "llama-3.1-70b", "--gpus-per-node", "1", "--gpu-memory", "48GiB", "--method", "qlora",
                    "--strategy", "zero2", "--loss", "full", "--ckpt-offload", "off", "--tiled-mlp", "off"]
# no single saver fits, two together do (activation offload AND the chunked loss). Host RAM 32 GiB: with the
# default 1 TiB fsdp_offload (the 70B NF4 shards in host RAM, 134.4 GiB) fits by itself
QLORA_70B_1x44GiB = ["--model", "llama-3.1-70b", "--gpus-per-node", "1", "--gpu-memory", "44GiB", "--method", "qlora",
                     "--cpu-memory", "32GiB", "--loss", "full", "--ckpt-offload", "off", "--tiled-mlp", "off"]
# no single change at all fits: forced grad_ckpt none at 64k tokens on one 24 GB card
NO_SINGLE = ["--model", "llama-3.1-8b", "--gpus-per-node", "1", "--gpu", "rtx4090", "--method", "qlora",
             "--seq-len", "65536", "--grad-ckpt", "none", "--loss", "full"]


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["plan", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _json(capsys, *args: str) -> tuple[int, dict]:
    rc, out, _ = _plan(capsys, *args, "--json")
    return rc, json.loads(out)


def _sets(s: dict) -> list[str]:
    return [a for k, v in s["set"].items() for a in ("--set", f"{k}={v}")]


FLAG_KEY = {f.flag: f.key for f in PLAN_FLAGS}


def _printed_args(text: str) -> list[list[str]]:
    """The suggestions as the table prints them: one line each, the arguments to append first."""
    block = text.split("to fit, append one of these")[1].split("\n\n")[0]
    return [shlex.split(m.group(1)) for ln in block.splitlines()[1:]
            if (m := re.match(r"^  (--\S.*?) +(saver|hardware|job) ", ln))]


def _as_keys(args: list[str]) -> dict:
    """Printed arguments back to config keys (flags through config/flags.py's table)."""
    out, it = {}, iter(args)
    for a in it:
        if a == "--set":
            k, _, v = next(it).partition("=")
            out[k] = v
        else:
            out[FLAG_KEY[a]] = next(it)
    return out


def _as_yaml(tmp_path: Path, base: list[str]) -> str:
    """The same job as a run config file, so that `--set` (which flags would beat) applies."""
    raw: dict = {}
    for flag, v in zip(base[::2], base[1::2]):
        section, key = FLAG_KEY[flag].split(".")
        raw.setdefault(section, {})[key] = v
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def _assert_every_suggestion_fits(capsys, tmp_path: Path, base: list[str]) -> list[dict]:
    rc, out, err = _plan(capsys, *base)
    assert rc == EXIT_NO_FIT
    rc, d = _json(capsys, *base)
    assert rc == EXIT_NO_FIT and d["fits"] is False
    sugg = d["suggestions"]
    assert sugg, err
    printed = _printed_args(out)
    assert [_as_keys(a) for a in printed] == [s["set"] for s in sugg]    # the table prints exactly these
    for a in printed:                                                    # ... and the no-fit message too
        assert " ".join(a) in err
    config = _as_yaml(tmp_path, base)
    for s, args in zip(sugg, printed):
        # as printed, appended to the user's own command (an appended flag beats the earlier one) ...
        rc, after = _json(capsys, *base, *args)
        assert rc == EXIT_OK and after["fits"], (s, after["why_not"])
        assert after["per_gpu"]["total"] == s["total_bytes"]
        assert after["estimated_step_time_s"] == pytest.approx(s["step_time_s"], rel=1e-6)
        assert after["suggestions"] == []
        # ... and the JSON's "set" applied with --set to the same job as a run config
        rc, again = _json(capsys, config, *_sets(s))
        assert rc == EXIT_OK and again["per_gpu"]["total"] == s["total_bytes"], (s, again["why_not"])
    # cheapest first: saver < hardware < job, then step time
    order = [(ChangeKind(s["kind"]).rank, s["step_time_s"]) for s in sugg]
    assert order == sorted(order)
    return sugg


def test_70b_full_on_8xh100_every_suggestion_fits(capsys, tmp_path):
    sugg = _assert_every_suggestion_fits(capsys, tmp_path, FULL_70B_8xH100)
    sets = [s["set"] for s in sugg]
    # the wrong advice: 8-bit AdamW (116.1 GiB per GPU) and the chunked loss (the peak is the
    # optimizer step) do not fit, so they are not shown
    assert {"train.optimizer": "adamw8bit"} not in sets and {"train.loss": "chunked"} not in sets
    # the host RAM it needs, at the minimum (one GiB less does not fit)
    ram = [s["set"]["hardware.cpu_memory"] for s in sugg if "hardware.cpu_memory" in s["set"]]
    assert ram, sets
    gib = int(ram[0].removesuffix("GiB"))
    rc, _ = _json(capsys, *FULL_70B_8xH100, "--cpu-memory", f"{gib - 1}GiB")
    assert rc == EXIT_NO_FIT


def test_70b_qlora_on_48gb_every_suggestion_fits(capsys, tmp_path):
    sugg = _assert_every_suggestion_fits(capsys, tmp_path, QLORA_70B_1x48GB)
    sets = [s["set"] for s in sugg]
    # issue: "--loss chunked" came first (still 45.9 > 45.6 GiB) and activation offload, which fits, was
    # missing; now the cheapest fitting change comes first
    assert sets[0] == {"train.activation_offload": "cpu"}
    assert {"train.loss": "chunked"} not in sets
    # a bigger GPU: the minimum that fits (one GiB less does not)
    mem = next(s["set"]["hardware.gpu_memory"] for s in sugg if "hardware.gpu_memory" in s["set"])
    rc, _ = _json(capsys, *QLORA_70B_1x48GB, "--gpu-memory", f"{int(mem.removesuffix('GiB')) - 1}GiB")
    assert rc == EXIT_NO_FIT
    # more GPUs: the fewest that fit
    gpus = next(s["set"]["hardware.gpus_per_node"] for s in sugg if "hardware.gpus_per_node" in s["set"])
    assert gpus == "2"


def test_saver_pair_when_no_single_saver_fits(capsys, tmp_path):
    sugg = _assert_every_suggestion_fits(capsys, tmp_path, QLORA_70B_1x44GiB)
    pair = {"train.activation_offload": "cpu", "train.loss": "chunked"}
    assert sugg[0]["set"] == pair and sugg[0]["kind"] == "saver"
    for k, v in pair.items():          # neither half fits alone
        rc, d = _json(capsys, *QLORA_70B_1x44GiB, "--set", f"{k}={v}")
        assert rc == EXIT_NO_FIT and not d["fits"]


def test_pairs_when_no_single_change_fits(capsys, tmp_path):
    sugg = _assert_every_suggestion_fits(capsys, tmp_path, NO_SINGLE)
    assert all(len(s["set"]) == 2 for s in sugg), sugg
    singles = {(k, v) for s in sugg for k, v in s["set"].items()}
    for k, v in singles:
        rc, _ = _json(capsys, *NO_SINGLE, "--set", f"{k}={v}")
        assert rc == EXIT_NO_FIT, (k, v)


def test_json_shape_and_roundtrip(capsys):
    rc, d = _json(capsys, *QLORA_70B_1x48GB)
    assert rc == EXIT_NO_FIT
    for s in d["suggestions"]:
        assert {"set", "total_bytes", "step_time_s"} <= set(s)
        assert all(isinstance(k, str) and isinstance(v, str) and "." in k for k, v in s["set"].items())
        assert isinstance(s["total_bytes"], int) and s["total_bytes"] <= d["gpu_memory_bytes"] * 2
        assert isinstance(s["step_time_s"], float) and s["step_time_s"] > 0
    rc, ok = _json(capsys, "--model", "llama-3.2-1b", "--gpus-per-node", "8")
    assert rc == EXIT_OK and ok["suggestions"] == []
    # plan.json (--full-json) round-trips the suggestions and the assumptions
    rc, full = _json(capsys, *QLORA_70B_1x48GB, "--full-json")
    again = Plan.from_json(json.loads(json.dumps(full)))
    assert again.to_json() == full and len(again.suggestions) == len(full["suggestions"])


def test_assumed_host_ram_is_marked(capsys):
    rc, out, err = _plan(capsys, *FULL_70B_8xH100)
    assert rc == EXIT_NO_FIT
    assert re.search(r"host RAM 1\.0 TiB/node \(assumed: give --cpu-memory\)", out)
    assert "Host RAM 1.0 TiB per node is an assumption" in err and "--cpu-memory" in err
    rc, d = _json(capsys, *FULL_70B_8xH100)
    assert d["assumed"] == {"hardware.cpu_memory": TiB}
    # the verdict rests on it: with 2 TiB it fits, and nothing is marked as assumed
    rc, out, err = _plan(capsys, *FULL_70B_8xH100, "--cpu-memory", "2TiB")
    assert rc == EXIT_OK and "assumed: give --cpu-memory" not in out
    rc, d = _json(capsys, *FULL_70B_8xH100, "--cpu-memory", "2TiB")
    assert d["assumed"] == {} and d["fits"]
    # given (even at the default figure): not an assumption
    rc, out, err = _plan(capsys, *FULL_70B_8xH100, "--cpu-memory", "1TiB")
    assert rc == EXIT_NO_FIT and "assumption" not in err and "(assumed" not in out


def test_text_bugs(capsys):
    rc, _, err = _plan(capsys, "--model", "llama-3.1-8bb")
    assert rc == 1 and "model: model:" not in err
    assert err.startswith("shardtrain: error: model.name: unknown preset 'llama-3.1-8bb'")
    rc, _, err = _plan(capsys, "--params", "7")
    assert rc == 1 and err.startswith("shardtrain: error: model.params: ")
    # "needs 49.2 GiB per GPU; needs 49.2 GiB per GPU > 45.6 GiB usable": the shortfall is said once
    rc, _, err = _plan(capsys, *QLORA_70B_1x48GB)
    head = err.split("To fit")[0]
    # the figure itself is the memory model's (52.5 GiB at 113d74d); this test is about saying it once
    assert head.count("per GPU") == 1
    assert re.search(r"needs \d+\.\d GiB per GPU \(reserved \+ CUDA context\) > 48\.0 GiB usable", head), head


def test_budget_and_speed():
    """`plan` must answer well under 2 s: the advice is bounded to MAX_REPLANS re-plans. Timed in CPU seconds of
    this process (time.process_time): wall time on the shared 2-core CI box measured the other jobs' load
    (4.6 s wall at load 11 for 0.8 s of CPU)."""
    worst = 0.0
    for base in (FULL_70B_8xH100, QLORA_70B_1x48GB, NO_SINGLE,
                 ["--model", "llama-3.1-405b", "--gpus-per-node", "1", "--gpu", "rtx4090", "--cpu-memory", "64GiB"]):
        o = {k.removeprefix("--"): v for k, v in zip(base[::2], base[1::2])}
        keys = {f.flag[2:]: f.key for f in PLAN_FLAGS}
        cfg = pipeline.load(None, {keys[k]: v for k, v in o.items()})
        with pytest.raises(NoFitError) as ei:
            pipeline.plan_for(cfg, advise=False)
        calls = []
        rp = pipeline.replanner(cfg)
        t = time.process_time()
        _, n = advice.advise(ei.value.plan, lambda ov: calls.append(ov) or rp(ov))
        worst = max(worst, time.process_time() - t)
        assert n == len(calls) <= advice.MAX_REPLANS
    print(f"slowest advice: {worst:.3f} CPU s")
    # CPU seconds: 0.4 s before issue 19/20's saver search; 1.0 s after it (70B full on 8 x H100, 9 re-plans;
    # measured 2026-12-05 at load 11, CPU time is load-independent)
    assert worst < 2.0


def test_advice_module_is_pure():
    """compiler/advice.py: no torch, no subprocess, no env vars, no config reading (ARCHITECTURE.md)."""
    src = Path(advice.__file__).read_text()
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add(node.module)
    assert all(m.startswith("shardtrain.compiler.") or m in {"__future__", "math", "collections.abc", "dataclasses",
                                                             "shardtrain.units"} for m in mods), mods


def test_nothing_found_says_so(capsys):
    """No verified change: no unverified advice either, and the message says what was tried."""
    base = ["--params", "2e12", "--gpus-per-node", "1", "--gpu", "rtx4090", "--cpu-memory", "16GiB",
            "--method", "qlora"]
    rc, out, err = _plan(capsys, *base)
    assert rc == EXIT_NO_FIT and "To fit" not in err and "to fit, append" not in out
    assert re.search(r"No single change, nor a pair of them, fits \(\d+ re-planned\)", err)
    rc, d = _json(capsys, *base)
    assert d["suggestions"] == []
