"""Plan -> engine configs, launch commands and the user's own-script configs (no torch; `shardtrain emit` /
`shardtrain check`).

- deepspeed.py    deepspeed_config(plan, trainer=...), verify(ds, plan), accessors — the only module
                  spelling DeepSpeed keys
- fsdp.py         fsdp_settings(plan) — FSDP2 settings (fsdp.json; torch objects: runtime/fsdp_wrap.py)
- runtime.py      with_runtime_facts(cfg, plan) — plan.json's "runtime" facts the ranks read
- accelerate.py   accelerate_config(plan) — `accelerate launch --config_file` YAML
- trainer.py      trainer_deepspeed_config(plan, cfg), training_arguments(...), lora_config, bnb_config — what an
                  HF Trainer / accelerate / peft script reads (hf_ds_config.json, trainer_args.json, ...)
- readme.py       the bundle's README.md: what the user's script must do
- bundle.py       every file `emit --out DIR` writes, and each `--format`
- check.py        the linter for DeepSpeed JSON / accelerate YAML
- check_hf.py     ... for trainer_args.json, lora_config.json, bnb_config.json
- check_bundle.py which kind a file is; the other emitted kinds (fsdp.json, plan.json, launch.sh, README.md, ...)
- cli.py          the `emit` and `check` subcommands
"""
