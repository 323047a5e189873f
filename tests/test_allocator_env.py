"""Every GPU launch runs the ranks with the CUDA allocator the plan's reserved figure assumed
(compiler/allocator.py; hardware.expandable_segments): local launch, launch.sh and Slurm jobs."""
from shardtrain.launcher import rankstart as rs
from shardtrain.slurm.job import SbatchJob
from shardtrain.slurm.script import render

KEY = "PYTORCH_CUDA_ALLOC_CONF"


def _spec(tmp_path, **kw):
    return rs.build_launch(run_dir=tmp_path, launcher="torchrun", nproc_per_node=2, gpus=2, cpu_count=4,
                           environ=kw.pop("environ", {}), **kw)


def test_local_gpu_launch_exports_the_plans_allocator(tmp_path):
    assert _spec(tmp_path).env[KEY] == "expandable_segments:True"
    assert KEY not in _spec(tmp_path, expandable_segments=False).env


def test_users_own_setting_wins(tmp_path):
    # The launcher inherits the caller's environment; it does not override what the user set.
    assert KEY not in _spec(tmp_path, environ={KEY: "max_split_size_mb:128"}).env


def test_cpu_launch_sets_no_cuda_allocator(tmp_path):
    spec = rs.build_launch(run_dir=tmp_path, launcher="torchrun", nproc_per_node=2, gpus=0, cpu_count=4, environ={})
    assert KEY not in spec.env


def test_slurm_job_follows_the_plan():
    job = dict(run_dir="/r", nodes=2, gpus_per_node=8, launcher="torchrun", job_name="j", python="python3")
    assert f"export {KEY}=expandable_segments:True" in render(SbatchJob(**job))
    assert KEY not in render(SbatchJob(**job, expandable_segments=False))
