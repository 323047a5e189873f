"""SLURM: ``SbatchJob`` + ``render()`` (pure) and ``submit()`` (the only effect)."""

from shardtrain.slurm.job import SbatchJob
from shardtrain.slurm.script import render, sbatch_options
from shardtrain.slurm.submit import SubmitError, parse_job_id, submit

__all__ = ["SbatchJob", "render", "sbatch_options", "SubmitError", "parse_job_id", "submit"]
