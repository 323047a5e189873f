"""Plan -> engine configs and launch commands (pure; `shardtrain emit` / `shardtrain check`).

- deepspeed.py  deepspeed_config(plan, trainer=...) — the only module spelling DeepSpeed keys
- fsdp.py       FsdpSettings / fsdp_settings(plan) — FSDP2 settings (fsdp.json)
- accelerate.py accelerate_config(plan) — `accelerate launch --config_file` YAML
- bundle.py     every file `emit --out DIR` writes, and each `--format`
- check.py      the linter for hand-written DeepSpeed JSON / accelerate YAML
- cli.py        the `emit` and `check` subcommands
"""
