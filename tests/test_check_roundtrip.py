"""Issue 22 acceptance: `shardtrain check` recognises every file `emit` writes and passes it — every file of
every emit golden (tests/golden/emit/) and of a fresh `emit --out` bundle with a run config — while a broken
copy of each kind still fails (so the round trip is not a rubber stamp). Kinds come from the content:
fsdp.json is FSDP2 settings, not DeepSpeed JSON (it used to give 1 error and 20 warnings)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shardtrain.cli import main
from shardtrain.emit.check import load_any

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "emit"
GOLDEN_FILES = sorted(p for d in GOLDEN.iterdir() for p in d.iterdir())
TINY = str(ROOT / "configs/examples/tiny-cpu.yaml")
KIND = {"ds_config.json": "deepspeed", "hf_ds_config.json": "deepspeed", "accelerate.yaml": "accelerate",
        "fsdp.json": "fsdp settings", "trainer_args.json": "trainer arguments", "lora_config.json": "peft LoraConfig",
        "bnb_config.json": "BitsAndBytesConfig", "plan.json": "plan", "run.yaml": "run config",
        "launch.sh": "launch script", "hostfile": "hostfile", "README.md": "bundle README",
        "torchrun.txt": "launch command", "deepspeed-cmd.txt": "launch command"}


def check(path: Path, *flags: str, capsys) -> tuple[int, list[dict]]:
    capsys.readouterr()
    code = main(["check", str(path), "--json", *flags])
    return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_every_golden_file_is_recognised_and_passes(capsys):
    assert len(GOLDEN_FILES) >= 80
    seen = set()
    for path in GOLDEN_FILES:
        kind, _ = load_any(path)
        assert kind == KIND[path.name], (path, kind)
        seen.add(KIND[path.name])
        code, out = check(path, capsys=capsys)
        errors = [o for o in out if o["severity"] == "error"]
        assert code == 0 and not errors, (path, errors)
    assert seen == set(KIND.values()) - {"plan", "run config"}  # goldens leave out plan.json and run.yaml


def test_qlora_golden_passes_with_the_method_named(capsys):
    """The QLoRA + FSDP accelerate YAML used to fail on bnb_4bit_quant_storage, which emit never wrote: the
    bundle's bnb_config.json now carries it and check reads it from beside the YAML."""
    d = GOLDEN / "fsdp_hybrid_shard-2x8xh100-qlora"
    for name in ("accelerate.yaml", "trainer_args.json"):
        code, out = check(d / name, "--method", "qlora", capsys=capsys)
        assert code == 0 and not [o for o in out if o["severity"] == "error"], (name, out)


def test_fresh_bundle_with_run_config_passes(tmp_path, capsys):
    for strategy in ("zero3", "fsdp_full_shard", "ddp"):
        out = tmp_path / strategy
        assert main(["emit", TINY, "--strategy", strategy, "--out", str(out)]) == 0
        for path in sorted(out.iterdir()):
            code, found = check(path, capsys=capsys)
            # a fresh bundle is where its paths say: no "moved bundle" warnings either
            assert code == 0 and not [o for o in found if o["severity"] != "info"], (path, found)


@pytest.fixture
def bundle(tmp_path):
    def copy(case: str) -> Path:
        d = tmp_path / case
        shutil.copytree(GOLDEN / case, d)
        return d
    return copy


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def test_broken_copies_fail(bundle, capsys):
    z = bundle("zero3_offload-8xh100-bf16-lora")
    f = bundle("fsdp_hybrid_shard-2x8xh100-qlora")
    _edit_json(z / "trainer_args.json", lambda d: d.update(per_device_train_batch_size=2))  # vs the JSON's 1
    _edit_json(f / "fsdp.json", lambda d: d.update(mesh_shape=[2, 4]))
    _edit_json(f / "lora_config.json", lambda d: d.update(rank=8))
    (z / "launch.sh").write_text((z / "launch.sh").read_text() + "\nif then fi (\n")
    (z / "README.md").write_text((z / "README.md").read_text().replace("- `ds_config.json`", "- `gone.json`"))
    bad = {z / "trainer_args.json": "per_device_train_batch_size", f / "fsdp.json": "mesh_shape",
           f / "lora_config.json": "LoraConfig", z / "launch.sh": "bash -n"}
    for path, word in bad.items():
        code, out = check(path, capsys=capsys)
        assert code == 1 and any(word in o["message"] or word == o["key"] for o in out if o["severity"] == "error"), \
            (path, out)
    code, out = check(z / "README.md", capsys=capsys)
    assert code == 0 and [o for o in out if o["key"] == "gone.json" and o["severity"] == "warning"]
    # QLoRA storage: uint8 under FSDP cannot be flattened with the bf16 params
    _edit_json(f / "bnb_config.json", lambda d: d.update(bnb_4bit_quant_storage="uint8"))
    code, out = check(f / "accelerate.yaml", "--method", "qlora", capsys=capsys)
    assert code == 1 and "bnb_4bit_quant_storage" in {o["key"] for o in out}
    (f / "bnb_config.json").unlink()  # without the bundle's bnb_config.json: the old error, with its fix
    code, out = check(f / "accelerate.yaml", "--method", "qlora", capsys=capsys)
    assert code == 1 and "bnb_4bit_quant_storage" in {o["key"] for o in out}


def test_plan_and_run_yaml_kinds(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["emit", TINY, "--strategy", "ddp", "--out", str(out)]) == 0
    _edit_json(out / "plan.json", lambda d: d.pop("spec"))
    code, found = check(out / "plan.json", capsys=capsys)
    assert code == 1 and "not a full plan" in found[0]["message"]
    (out / "run.yaml").write_text((out / "run.yaml").read_text().replace("seq_len:", "seq_lenn:"))
    code, found = check(out / "run.yaml", capsys=capsys)
    assert code == 1 and "seq_lenn" in found[0]["message"]


@pytest.mark.parametrize("job", [
    # the DDP LoRA job: since issue 19/20 (op checkpointing, headroom 0) it plans zero1 on a cp 2 mesh by
    # itself, whose DeepSpeed JSON would notice the edit too; DDP (1.26x slower, fits) is what this case is for
    ["--model", "qwen2.5-7b", "--method", "lora", "--gpus-per-node", "2", "--gpu", "a100-40gb", "--seq-len", "8192",
     "--strategy", "ddp"],
    ["--model", "llama-3.1-70b", "--method", "qlora", "--strategy", "fsdp_full_shard", "--gpus-per-node", "2",
     "--gpu", "a100-80gb"],
], ids=["issue-case-ddp-lora", "fsdp-qlora"])
def test_check_takes_a_whole_bundle(tmp_path, capsys, job):
    """`shardtrain check BUNDLE/*` (the way a user checks what emit wrote): one verdict per file, exit 0;
    trainer_args.json edited away from the plan.json beside it (DDP/FSDP: nothing else would notice) makes
    it exit 1 and names that file."""
    out = tmp_path / "b"
    assert main(["emit", *job, "--out", str(out)]) == 0
    files = sorted(str(p) for p in out.iterdir())
    capsys.readouterr()
    assert main(["check", *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(ln.split(": ok (")[0] for ln in lines if ": ok (" in ln) == files, lines
    planned = json.loads((out / "trainer_args.json").read_text())["gradient_accumulation_steps"]
    _edit_json(out / "trainer_args.json", lambda d: d.update(gradient_accumulation_steps=planned + 1))
    assert main(["check", *files]) == 1
    bad = [ln for ln in capsys.readouterr().out.splitlines() if "error" in ln]
    assert len(bad) == 1 and bad[0].startswith(str(out / "trainer_args.json")), bad
    assert "gradient_accumulation_steps" in bad[0] and f"says {planned}" in bad[0]
