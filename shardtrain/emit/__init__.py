"""Plan -> engine configs and launch commands (no torch; `shardtrain emit` / `shardtrain check`).

- deepspeed.py  deepspeed_config(plan, trainer=...), verify(ds, plan), accessors — the only module
                spelling DeepSpeed keys
- fsdp.py       fsdp_settings(plan) — FSDP2 settings (fsdp.json; torch objects: runtime/fsdp_wrap.py)
- runtime.py    with_runtime_facts(cfg, plan) — plan.json's "runtime" facts the ranks read
- accelerate.py accelerate_config(plan) — `accelerate launch --config_file` YAML
- bundle.py     every file `emit --out DIR` writes, and each `--format`
- check.py      the linter for hand-written DeepSpeed JSON / accelerate YAML
- cli.py        the `emit` and `check` subcommands
"""
