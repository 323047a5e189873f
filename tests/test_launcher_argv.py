"""Launch commands are data: the argv builders' output is parsed by the installed launchers' own
argument parsers (torch.distributed.run, deepspeed.launcher.runner) with the values intact, and
rendered scripts preserve every word exactly when bash runs them."""
from __future__ import annotations

import subprocess
import sys

import pytest

from shardtrain.launcher.rankstart import deepspeed_argv, hostfile_text, render_launch_script, torchrun_argv


def _torchrun(argv):
    from torch.distributed.run import get_args_parser
    assert argv[0] == "torchrun"
    return get_args_parser().parse_args(argv[1:])


def _deepspeed(argv):
    from deepspeed.launcher.runner import parse_args
    assert argv[0] == "deepspeed"
    return parse_args(argv[1:])


def test_torchrun_single_node_standalone():
    a = _torchrun(torchrun_argv(nproc_per_node=8, script_args=["--run-dir", "/r d"]))
    assert a.standalone and a.nnodes == "1" and a.nproc_per_node == "8" and a.max_restarts == 0
    assert a.module and a.training_script == "shardtrain.runtime.worker" and a.training_script_args == ["--run-dir", "/r d"]


def test_torchrun_multi_node_c10d():
    argv = torchrun_argv(nproc_per_node=4, nnodes=2, node_rank=1, rdzv_endpoint="n0:29400", rdzv_id="job7",
                         max_restarts=3, log_dir="/l", redirects=3)
    a = _torchrun(argv)
    assert (a.nnodes, a.node_rank, a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id, a.max_restarts) == \
        ("2", 1, "c10d", "n0:29400", "job7", 3)
    assert a.log_dir == "/l" and a.redirects == "3" and not a.standalone


def test_torchrun_python_form():
    argv = torchrun_argv(nproc_per_node=2, module="m", python=sys.executable)
    assert argv[:3] == [sys.executable, "-m", "torch.distributed.run"] and argv[-2:] == ["-m", "m"]


@pytest.mark.parametrize("kw,match", [
    (dict(nproc_per_node=0), "positive"), (dict(nproc_per_node=2, nnodes=2), "rdzv_endpoint"),
    (dict(nproc_per_node=2, nnodes=2, rdzv_endpoint="h:1", rdzv_id="x", node_rank=2), "node_rank")])
def test_torchrun_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        torchrun_argv(**kw)


def test_deepspeed_single_node():
    a = _deepspeed(deepspeed_argv(num_gpus=8, master_port=29512, script_args=["--run-dir", "/r"]))
    assert (a.num_gpus, a.num_nodes, a.master_port, a.module, a.no_local_rank) == (8, 1, 29512, True, True)
    assert a.user_script == "shardtrain.runtime.worker" and a.user_args == ["--run-dir", "/r"]


def test_deepspeed_multi_node_hostfile_and_no_ssh():
    a = _deepspeed(deepspeed_argv(num_gpus=4, num_nodes=2, hostfile="/h/hostfile", master_addr="n0", master_port=1234))
    assert (a.hostfile, a.num_nodes, a.master_addr, a.master_port, a.no_ssh) == ("/h/hostfile", 2, "n0", 1234, False)
    b = _deepspeed(deepspeed_argv(num_gpus=4, num_nodes=2, no_ssh=True, node_rank=1, master_addr="n0",
                                  hostfile="/h/hostfile"))
    assert b.no_ssh and b.node_rank == 1
    c = _deepspeed(deepspeed_argv(num_gpus=2, each_rank_log="/l d"))
    assert c.enable_each_rank_log == "/l d" and c.module and c.user_script == "shardtrain.runtime.worker"


@pytest.mark.parametrize("kw,match", [
    (dict(num_gpus=0), "num_gpus"),
    (dict(num_gpus=2, num_nodes=2), "hostfile"), (dict(num_gpus=2, num_nodes=2, no_ssh=True), "node_rank")])
def test_deepspeed_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        deepspeed_argv(**kw)


def test_hostfile_parsed_by_deepspeed():
    from deepspeed.launcher.runner import _parse_hostfile
    text = hostfile_text(["node-a", "node-b"], 8)
    assert text == "node-a slots=8\nnode-b slots=8\n"
    assert dict(_parse_hostfile(text.splitlines())) == {"node-a": 8, "node-b": 8}
    for bad in ([], ["a", "a"], ["a b"]):
        with pytest.raises(ValueError):
            hostfile_text(bad, 8)


def test_rendered_script_preserves_every_word(tmp_path):
    words = ["a b", "$HOME", "'q'", '"dq"', "x;rm -rf /", "`id`", "*", "--flag=v w"]
    argv = [sys.executable, "-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *words]
    script = render_launch_script(argv, {"MY_VAR": "v a l$x"}, comment="test\nsecond line")
    f = tmp_path / "launch.sh"
    f.write_text(script)
    subprocess.run(["bash", "-n", str(f)], check=True)
    r = subprocess.run(["bash", str(f), "extra arg"], capture_output=True, text=True, check=True)
    import json
    assert json.loads(r.stdout) == words + ["extra arg"]
    r = subprocess.run(["bash", "-c", f"source <(sed -n '/^export/p' {f}); printf %s \"$MY_VAR\""],
                       capture_output=True, text=True, check=True)
    assert r.stdout == "v a l$x"
    with pytest.raises(ValueError):
        render_launch_script(["x"], {"BAD-NAME": "1"})
