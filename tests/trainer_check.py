"""Run emitted `trainer` DeepSpeed JSON through transformers' own DeepSpeed integration, in a fresh
process (TrainingArguments(deepspeed=...) initialises accelerate's global state and a process group).

`python tests/trainer_check.py CASES.json OUT.json`: each case {"name", "plan" (make_plan kwargs),
"override" (TrainingArguments overrides, optional), "train" (bool: also run Trainer.train() one step)}
gives {"name": {"mismatch": str|None, "autos_left": [...], "loss": float|None}}.
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
    import torch
    from transformers import Trainer, TrainingArguments

    import ds_step
    from emit_plans import make_plan
    from shardtrain.emit.check import find_auto_keys
    from shardtrain.emit.deepspeed import deepspeed_config, trainer_arguments
    results = {}
    for case in json.loads(Path(cases_path).read_text()):
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
            class Data(torch.utils.data.Dataset):
                def __len__(self):
                    return 64

                def __getitem__(self, i):
                    ids = torch.randint(0, 512, (16,), generator=torch.Generator().manual_seed(i))
                    return {"input_ids": ids, "labels": ids}
            args = TrainingArguments(output_dir=str(Path(out_path).parent / "trainer_out"), deepspeed=cfg,
                                     max_steps=1, report_to=[], save_strategy="no", use_cpu=True, **kw)
            out = Trainer(model=ds_step.tiny_model(), args=args, train_dataset=Data()).train()
            res["loss"] = out.training_loss
        results[case["name"]] = res
    Path(out_path).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
