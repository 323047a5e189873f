"""Issue 13 (a): every file and flag the CLI reads ends in a plan / findings or in ONE
`shardtrain: error: …` line naming the file (or key) — never another exception.

The CLI's `main` runs in-process (a plan costs ~10 ms), so the property-based part generates well over
1,000 inputs per run: random run configs, random argv vectors, corrupted DeepSpeed JSON and accelerate
YAML (starting from the golden files the emitters wrote) given to `shardtrain check`.
"""
from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardtrain.cli import main

GOLDEN = Path(__file__).parent / "golden" / "emit"
def FUZZ(n: int):
    """n examples per CI run (derandomized: the same inputs every run, so CI failures reproduce)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """main(argv) in-process: returns (rc, stdout, stderr). Any exception other than argparse's
    SystemExit propagates and fails the test (that is the bug this file hunts)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors: exit 2 with a usage line
        rc = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(rc: int, err: str, *names: str) -> str:
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("shardtrain: error: "), err
    assert "Traceback" not in err
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ------------------------------------------------------------------ hostile files, one by one
def _hostile_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a word the error line must contain besides the path)."""
    out = {}

    def put(name, data: bytes, word):
        p = tmp / name
        p.write_bytes(data)
        out[name] = (p, word)
    put("binary.yaml", bytes(range(256)) * 4, "binary")
    put("latin1.yaml", "model:\n  name: caf\xe9\n".encode("latin-1"), "UTF-8")
    put("deep-flow.yaml", b"a: " + b"[" * 5000 + b"]" * 5000, "nested")
    put("deep-block.yaml", "".join(f"{' ' * i}k{i}:\n" for i in range(5000)).encode(), "nested")
    put("huge-int.yaml", b"model:\n  name: llama-3.1-8b\ntrain:\n  seq_len: 1e400\n", "seq_len")
    put("nan.yaml", b"model:\n  name: llama-3.1-8b\ntrain:\n  lr: .nan\n", "lr")
    put("tag.yaml", b"model: !!python/object/apply:os.system ['echo pwned']\n", "tags")
    put("custom-tag.yaml", b"model: !include other.yaml\n", "tags")
    put("truncated.yaml", b"model:\n  name: [llama-3.1-8b\n", "YAML")
    put("list.yaml", b"- model\n- train\n", "mapping")
    put("alias-bomb.yaml", b"a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\nmodel: *c\n", "model")
    put("big.yaml", b"# " + b"x" * (17 * 2**20) + b"\n", "MiB")
    laughs, prev = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'], "a"
    for n in "bcdefghi":  # 9^9 values once expanded: an alias bomb, not a config
        laughs.append(f"{n}: &{n} [" + ",".join(["*" + prev] * 9) + "]")
        prev = n
    put("billion-laughs.yaml", ("\n".join(laughs) + "\nmodel:\n  name: *i\n").encode(), "aliases")
    (tmp / "adir").mkdir()
    out["adir"] = (tmp / "adir", "directory")
    os.symlink(tmp / "loop2", tmp / "loop1")
    os.symlink(tmp / "loop1", tmp / "loop2")
    out["loop1"] = (tmp / "loop1", "loop")
    out["missing.yaml"] = (tmp / "missing.yaml", "does not exist")
    return out


HOSTILE = ["binary.yaml", "latin1.yaml", "deep-flow.yaml", "deep-block.yaml", "huge-int.yaml", "nan.yaml", "tag.yaml",
           "custom-tag.yaml", "truncated.yaml", "list.yaml", "alias-bomb.yaml", "big.yaml", "billion-laughs.yaml",
           "adir", "loop1", "missing.yaml"]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_run_config(tmp_path, capsys, name):
    path, word = _hostile_files(tmp_path)[name]
    rc, _, err = run_cli(["plan", path], capsys)
    line = assert_one_error_line(rc, err, word)
    if word not in ("seq_len", "lr", "model"):  # value errors name the key, file errors the file
        assert name in line


@pytest.mark.parametrize("name", ["binary.yaml", "deep-flow.yaml", "tag.yaml", "truncated.yaml", "adir", "loop1",
                                  "missing.yaml", "big.yaml", "billion-laughs.yaml"])
def test_hostile_file_given_to_check(tmp_path, capsys, name):
    path, word = _hostile_files(tmp_path)[name]
    rc, _, err = run_cli(["check", path], capsys)
    assert_one_error_line(rc, err, name, word)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path, capsys):
    p = tmp_path / "run.yaml"
    p.write_text("model:\n  name: llama-3.1-8b\n")
    p.chmod(0)
    rc, _, err = run_cli(["plan", p], capsys)
    assert_one_error_line(rc, err, "run.yaml", "chmod")


def test_hostile_hf_config_json(tmp_path, capsys):
    for name, data in (("config.json", b'{"model_type": "llama", "hidden_size": NaN}'),
                       ("config.json", b"\x00\x01\x02"), ("config.json", b"[" * 5000)):
        d = tmp_path / f"m{len(data)}"
        d.mkdir()
        (d / name).write_bytes(data)
        rc, _, err = run_cli(["plan", "--model", d / name], capsys)
        assert_one_error_line(rc, err, str(d / name))


def test_hostile_plan_json(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  name: llama-3.1-8b\n")
    for i, data in enumerate((b"\xff\xfe", b"", b"{}", b'{"strategy": 5}', b"[1]", b"{" * 4000)):
        p = tmp_path / f"plan{i}.json"
        p.write_bytes(data)
        rc, _, err = run_cli(["launch", good, "--plan", p, "--dry-run"], capsys)
        assert_one_error_line(rc, err, p.name)


def test_model_and_params_conflict(capsys):
    rc, _, err = run_cli(["plan", "--model", "llama-3.1-8b", "--params", "nan"], capsys)
    assert_one_error_line(rc, err, "--model", "--params")
    rc, _, err = run_cli(["plan", "--params", "nan"], capsys)
    assert_one_error_line(rc, err, "model.params")
    # a flag still replaces the FILE's model (the flag wins over the file, as documented)
    rc, out, _ = run_cli(["plan", "--params", "1e9", "--json"], capsys)
    assert rc in (0, 2) and json.loads(out)["model"]["num_params"] > 0


# ------------------------------------------------------------------ property-based
_SCHEMA = {
    "model": ["name", "params", "hidden", "layers", "heads", "kv_heads", "vocab", "intermediate", "init", "bogus"],
    "hardware": ["nodes", "gpus_per_node", "gpu", "gpu_memory", "cpu_memory", "nvme_path", "nvme_capacity"],
    "train": ["seq_len", "micro_batch", "global_batch", "precision", "method", "optimizer", "grad_ckpt", "strategy",
              "lr", "steps", "headroom", "warmup_steps", "selective_every", "attention", "grad_clip"],
    "lora": ["rank", "alpha", "dropout", "targets"],
    "data": ["train", "eval_fraction", "format", "packing"],
    "run": ["checkpoint_every", "resume", "device", "launcher", "log_every", "keep_checkpoints"],
}
_WORDS = ["llama-3.1-8b", "tiny-llama", "gpt2", "auto", "bf16", "fp32", "lora", "qlora", "zero3", "ddp", "80GiB",
          "1e9", "7.5B", "nan", "inf", "-1", "0", "1e400", "", "none", "~", "full", "adamw", "a100-80gb", "h100-80gb"]
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.integers(-2**70, 2**70), st.sampled_from([1, 2, 4, 8, 64, 4096]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(_WORDS), st.text(string.printable, max_size=12))
_VALUES = st.recursive(_SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                       max_leaves=5)


def _value_for(key: str):
    # Mostly plausible values so that many examples reach the planner, some garbage.
    good = {"name": st.sampled_from(["llama-3.1-8b", "llama-3.2-1b", "tiny-llama", "mistral-7b", "nope"]),
            "params": st.sampled_from([1e8, 7.5e9, "70B", "1e9"]),
            "seq_len": st.integers(1, 2**17), "micro_batch": st.sampled_from(["auto", 1, 2, 8]),
            "global_batch": st.integers(1, 512), "nodes": st.integers(1, 4), "gpus_per_node": st.integers(1, 16),
            "strategy": st.sampled_from(["auto", "ddp", "zero2", "zero3", "fsdp_full_shard", "zero_infinity"]),
            "method": st.sampled_from(["full", "lora", "qlora"]), "precision": st.sampled_from(["bf16", "fp16", "fp32"])}
    return st.one_of(good[key], _VALUES) if key in good else _VALUES


@st.composite
def run_configs(draw):
    cfg: dict = {"model": {"name": draw(st.sampled_from(["llama-3.1-8b", "llama-3.2-1b", "tiny-llama"]))}}
    for section in draw(st.lists(st.sampled_from(sorted(_SCHEMA)), max_size=4, unique=True)):
        keys = draw(st.lists(st.sampled_from(_SCHEMA[section]), max_size=4, unique=True))
        cfg.setdefault(section, {}).update({k: draw(_value_for(k)) for k in keys})
    if draw(st.integers(0, 9)) == 0:
        cfg[draw(st.sampled_from(["model", "train", "x"]))] = draw(_VALUES)
    return cfg


def _ok_or_error(rc, out, err) -> None:
    """A finished plan (exit 0, or 2 = does not fit, with the plan printed) or one error line."""
    assert "Traceback" not in err + out
    if rc == 0:
        assert out.strip()
    elif rc == 2 and "usage:" in err:
        assert "error:" in err  # argparse: a bad flag value (type=int, ...)
    elif rc == 2:
        assert out.strip() and "shardtrain:" in err
    else:
        assert rc == 1 and err.strip().splitlines()[-1].startswith("shardtrain: error: ") and len(err) > 25, err


@FUZZ(500)
@given(cfg=run_configs())
def test_fuzz_run_configs(cfg, tmp_path_factory, capsys):
    p = tmp_path_factory.mktemp("cfg", numbered=True) / "run.yaml"
    p.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    _ok_or_error(*run_cli(["plan", p, "--json"], capsys))


_FLAGS = ["--model", "--params", "--hidden", "--layers", "--heads", "--nodes", "--gpus-per-node", "--gpu",
          "--gpu-memory", "--cpu-memory", "--nvme-path", "--seq-len", "--micro-batch", "--global-batch",
          "--precision", "--method", "--lora-rank", "--optimizer", "--grad-ckpt", "--strategy", "--steps", "--set"]


@st.composite
def argvs(draw):
    argv = ["plan"]
    if draw(st.booleans()):
        argv += ["--model", draw(st.sampled_from(["llama-3.1-8b", "llama-3.2-1b", "tiny-llama", "x/config.json"]))]
    for flag in draw(st.lists(st.sampled_from(_FLAGS), max_size=5)):
        v = draw(st.one_of(st.sampled_from(_WORDS), st.integers(-5, 2**40).map(str), st.text(string.printable, max_size=10)))
        if flag == "--set":
            v = draw(st.sampled_from(["train.", "model.", "run.", "hardware.", "", "x.y."])) + \
                draw(st.sampled_from(["seq_len", "lr", "steps", "name", "params", "keep_checkpoints", "z"])) + "=" + v
        argv += [flag, v]
    if draw(st.booleans()):
        argv.append("--json")
    return argv


@FUZZ(400)
@given(argv=argvs())
def test_fuzz_cli_argv(argv, capsys):
    _ok_or_error(*run_cli(argv, capsys))


def _ds_samples() -> list[Path]:
    root = Path(__file__).resolve().parents[1]
    found = sorted(root.glob("tests/golden/**/*.json")) + sorted(root.glob("tests/golden/**/accelerate.yaml"))
    return [p for p in found if p.stat().st_size < 100_000]


SAMPLES = _ds_samples()


@st.composite
def corrupted(draw):
    src = draw(st.sampled_from(SAMPLES))
    data = src.read_bytes()
    how = draw(st.sampled_from(["truncate", "flip", "retype", "drop", "insert"]))
    if how == "truncate":
        data = data[:draw(st.integers(0, len(data)))]
    elif how == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, max(0, len(data) - 1)))
            data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1:]
    else:
        obj = json.loads(data) if src.suffix == ".json" else yaml.safe_load(data)
        paths = []

        def walk(o, at):
            if isinstance(o, dict):
                for k, v in o.items():
                    paths.append((o, k))
                    walk(v, at + [k])
        walk(obj, [])
        if paths:
            parent, key = draw(st.sampled_from(paths))
            if how == "retype":
                parent[key] = draw(_VALUES)
            elif how == "drop":
                del parent[key]
            else:
                parent[draw(st.text(string.ascii_lowercase + "_", min_size=1, max_size=12))] = draw(_VALUES)
        data = (json.dumps(obj) if src.suffix == ".json" else yaml.safe_dump(obj)).encode()
    return src.suffix, data


@pytest.mark.skipif(not SAMPLES, reason="no golden DeepSpeed/accelerate files")
@FUZZ(200)
@given(sample=corrupted())
def test_fuzz_check_corrupted_engine_configs(sample, tmp_path_factory, capsys):
    suffix, data = sample
    p = tmp_path_factory.mktemp("chk", numbered=True) / f"cfg{suffix}"
    p.write_bytes(data)
    rc, out, err = run_cli(["check", p, "--gpus-per-node", "8"], capsys)
    assert "Traceback" not in out + err
    if rc == 0:
        assert str(p) in out
    else:
        assert rc == 1
        assert (err.startswith("shardtrain: error: ") and str(p) in err) or f"{p}: " in out, (out, err)


@pytest.mark.parametrize("junk", [b"\xff\xfe\x00binary", b"- a\n- list\n", b"[" * 3000])
def test_damaged_run_dir_files_on_resume(tmp_path, capsys, junk):
    """A run dir whose run.yaml / plan.json / metrics.jsonl got damaged: one error line (or a fresh
    prepare), never a traceback — checked through the launcher's run-dir writer directly."""
    from shardtrain.config import pipeline
    from shardtrain.config.schema import ConfigError
    from shardtrain import rundir_format as rf
    from shardtrain.launcher import rundir
    tiny = Path(__file__).resolve().parents[1] / "configs" / "examples" / "tiny-cpu.yaml"
    cfg, plan = pipeline.compile(tiny)
    d = tmp_path / "run"
    rundir.write_run_dir(d, cfg, plan)
    for name in ("run.yaml", "plan.json", "metrics.jsonl"):
        (d / name).write_bytes(junk)
    assert rf.completed_steps(d) == 0
    # every damaged file makes the stored settings unreadable: the writer must refuse to resume (a bare
    # try/except here passed when nothing was raised at all)
    with pytest.raises(ConfigError) as e:
        rundir.write_run_dir(d, cfg, plan)
    assert "--no-resume" in str(e.value) and str(d) in str(e.value)
