"""Run emitted `trainer` DeepSpeed JSON through transformers' own DeepSpeed integration, in a fresh
process (TrainingArguments(deepspeed=...) initialises accelerate's global state and a process group).

`python tests/trainer_check.py CASES.json OUT.json`: each case {"name", "plan" (make_plan kwargs),
"override" (TrainingArguments overrides, optional), "train" (bool: also run Trainer.train() one step)}
gives {"name": {"mismatch": str|None, "autos_left": [...], "loss": float|None}}.
A case with "bundle" (an `emit --out` directory) instead of "plan" builds TrainingArguments from the bundle's
trainer_args.json exactly as a user's script would (`TrainingArguments(**json.load(...), output_dir=...)`),
then: the DeepSpeed JSON it points at through the Trainer's own processing and DeepSpeed's parser, the FSDP
plugin arguments through accelerate's FullyShardedDataParallelPlugin, lora_config.json through peft's
LoraConfig, bnb_config.json through BitsAndBytesConfig; the result also has "error" (str|None) and, after
a train step, "checkpointing" (whether the Trainer turned activation checkpointing on).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                  LOCAL_SIZE="1")
os.environ.setdefault("MASTER_PORT", str(29300 + os.getpid() % 600))


def main(cases_path: str, out_path: str) -> int:
    from transformers import Trainer, TrainingArguments

    import ds_step
    from emit_plans import make_plan
    from shardtrain.emit.check import find_auto_keys
    from shardtrain.emit.deepspeed import deepspeed_config, trainer_arguments
    results = {}
    for case in json.loads(Path(cases_path).read_text()):
        if "bundle" in case:
            results[case["name"]] = check_bundle(case, Path(out_path).parent)
            continue
        plan = make_plan(**case["plan"])
        cfg = deepspeed_config(plan, trainer=True)
        kw = {**trainer_arguments(plan, lr=1e-3), **case.get("override", {})}
        args = TrainingArguments(output_dir=str(Path(out_path).parent / "trainer_out"), deepspeed=cfg, max_steps=1,
                                 report_to=[], save_strategy="no", use_cpu=True, **kw)
        model = ds_step.tiny_model()
        res = {"mismatch": None, "autos_left": [], "loss": None}
        try:
            args.hf_deepspeed_config.trainer_config_finalize(args, model, num_training_steps=10)
        except ValueError as e:
            res["mismatch"] = str(e)
        res["autos_left"] = list(find_auto_keys(args.hf_deepspeed_config.config))
        if case.get("train") and res["mismatch"] is None:
            args = TrainingArguments(output_dir=str(Path(out_path).parent / "trainer_out"), deepspeed=cfg,
                                     max_steps=1, report_to=[], save_strategy="no", use_cpu=True, **kw)
            out = Trainer(model=ds_step.tiny_model(), args=args, train_dataset=_data()).train()
            res["loss"] = out.training_loss
        results[case["name"]] = res
    Path(out_path).write_text(json.dumps(results, indent=1))
    return 0


def _data():
    import torch

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            ids = torch.randint(0, 512, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": ids, "labels": ids}
    return Data()


def check_bundle(case: dict, work: Path) -> dict:
    """One emitted bundle through the real classes (see the module docstring)."""
    import types

    from transformers import BitsAndBytesConfig, Trainer, TrainingArguments

    import ds_step
    from shardtrain.emit.check import find_auto_keys
    d = Path(case["bundle"])
    kw = {**json.loads((d / "trainer_args.json").read_text()), **case.get("override", {})}
    res = {"mismatch": None, "autos_left": [], "loss": None, "error": None, "checkpointing": None}
    common = dict(output_dir=str(work / "trainer_out"), max_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    try:
        args = TrainingArguments(**common, **kw)
    except (TypeError, ValueError) as e:
        res["error"] = f"TrainingArguments: {e}"
        return res
    if (d / "lora_config.json").is_file():
        from peft import LoraConfig
        LoraConfig(**json.loads((d / "lora_config.json").read_text()))
    if (d / "bnb_config.json").is_file():
        BitsAndBytesConfig(**json.loads((d / "bnb_config.json").read_text()))
    if args.fsdp_plugin_args is not None:
        from accelerate.utils import FullyShardedDataParallelPlugin
        plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        res["fsdp"] = {"reshard_after_forward": plugin.reshard_after_forward,
                       "activation_checkpointing": plugin.activation_checkpointing,
                       "transformer_cls_names_to_wrap": plugin.transformer_cls_names_to_wrap}
    if args.deepspeed:
        hf = args.hf_deepspeed_config
        try:
            hf.trainer_config_finalize(args, ds_step.tiny_model(), num_training_steps=10)
        except ValueError as e:
            res["mismatch"] = str(e)
            return res
        res["autos_left"] = list(find_auto_keys(hf.config))
        import deepspeed.runtime.config as dsc
        old = dsc.dist
        dsc.dist = types.SimpleNamespace(get_rank=lambda: 0, get_world_size=lambda: 1)
        try:
            dsc.DeepSpeedConfig(json.loads(json.dumps(hf.config)))
        except Exception as e:  # noqa: BLE001  (DeepSpeed raises assertions, pydantic and its own errors)
            res["error"] = f"DeepSpeedConfig: {type(e).__name__}: {e}"
        finally:
            dsc.dist = old
    if case.get("train") and res["error"] is None:
        model = ds_step.tiny_model()
        trainer = Trainer(model=model, args=TrainingArguments(**common, **kw), train_dataset=_data())
        res["loss"] = trainer.train().training_loss
        res["checkpointing"] = bool(getattr(trainer.model, "is_activation_checkpointing", False))
        res["train_batch_size"] = trainer._train_batch_size
        res["accumulation"] = trainer.args.gradient_accumulation_steps
    return res


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
