"""PreemptionHandler: signal -> flag, collective agreement, requeue decision (fake scontrol)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shardtrain.exitcodes import signal_name, signal_number
from shardtrain.runtime.preempt import PreemptionHandler

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def handler():
    h = PreemptionHandler()
    h.install()
    yield h
    h.uninstall()


def test_signal_number():
    assert signal_number("USR2") == signal.SIGUSR2
    assert signal_number("sigterm") == signal.SIGTERM
    assert signal_number(10) == signal.SIGUSR1
    for bad in ("NOPE", "USR2; rm", "", 999):
        with pytest.raises(ValueError):
            signal_number(bad)
    assert signal_name("SIGUSR1") == "USR1" and signal_name("term") == "TERM"  # as sbatch and trap spell it


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_signal_to_self_sets_flag(handler, sig):
    assert not handler.signalled and not handler.should_stop()
    os.kill(os.getpid(), sig)
    assert handler.signalled  # Python runs the handler before the next bytecode
    assert handler.received_signal == sig.name
    assert handler.should_stop()  # no process group: the local flag


def test_uninstall_restores_previous():
    before = signal.getsignal(signal.SIGUSR2)
    h = PreemptionHandler(("USR2",))
    h.install()
    assert signal.getsignal(signal.SIGUSR2) == h._handler
    h.uninstall()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_env_signal_is_added(monkeypatch):
    monkeypatch.setenv("SHARDTRAIN_PREEMPT_SIGNAL", "USR1")
    h = PreemptionHandler()
    h.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert h.signalled
    finally:
        h.uninstall()


def test_from_env(monkeypatch):
    monkeypatch.setenv("SHARDTRAIN_PREEMPT_SIGNAL", "USR1")
    monkeypatch.setenv("SHARDTRAIN_MAX_REQUEUES", "7")
    h = PreemptionHandler.from_env()
    # issue 13: TERM, INT, USR1 and USR2 all mean "checkpoint and stop"; the env's signal comes first
    assert h.signals == (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT) and h.max_requeues == 7
    monkeypatch.delenv("SHARDTRAIN_PREEMPT_SIGNAL")
    monkeypatch.delenv("SHARDTRAIN_MAX_REQUEUES")
    h = PreemptionHandler.from_env(default_max_requeues=2)
    assert h.signals == (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) and h.max_requeues == 2


_CHILD = textwrap.dedent("""\
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    print("inherited", signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN, flush=True)
    if sys.argv[1] == "install":
        from shardtrain.runtime.preempt import PreemptionHandler
        h = PreemptionHandler()
        h.install()
    os.kill(os.getpid(), signal.SIGUSR2)
    os.kill(os.getpid(), signal.SIGUSR2)
    print("alive", h.signalled if sys.argv[1] == "install" else None, flush=True)
""")


@pytest.mark.parametrize("mode", ["install", "bare"])
def test_inherited_sig_ign(tmp_path, mode):
    """The launcher pattern: `trap "" USR2; exec …` -> ignored across exec (launcher survives);
    install() overrides the inherited SIG_IGN (the worker sees the signal)."""
    child = tmp_path / "child.py"
    child.write_text(_CHILD.format(repo=str(REPO)))
    cmd = f'trap "" USR2 TERM; exec "$0" {child} {mode}'
    proc = subprocess.run(["bash", "-c", cmd, sys.executable], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "inherited True" in proc.stdout
    assert ("alive True" if mode == "install" else "alive None") in proc.stdout


# -- collective ------------------------------------------------------------------------------

_DIST = textwrap.dedent("""\
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import torch.distributed as dist
    from shardtrain.runtime.preempt import PreemptionHandler
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2)
    h = PreemptionHandler()
    h.install()
    out = []
    for step in range(1, 6):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGUSR2)
        stop = h.should_stop()
        out.append(int(stop))
        if stop:
            break
    print("rank", rank, "signalled", int(h.signalled), "stops", out, flush=True)
    dist.barrier()
    dist.destroy_process_group()
""")


def test_should_stop_agrees_across_ranks_gloo(tmp_path):
    script = tmp_path / "dist.py"
    script.write_text(_DIST.format(repo=str(REPO)))
    store = tmp_path / "store"
    procs = [
        subprocess.Popen([sys.executable, str(script), str(r), str(store)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert "rank 0 signalled 0 stops [0, 0, 1]" in outs[0]
    assert "rank 1 signalled 1 stops [0, 0, 1]" in outs[1]


# -- requeue ---------------------------------------------------------------------------------


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "scontrol.log"
    exe = bindir / "scontrol"
    exe.write_text(f'#!/bin/bash\necho "$@" >> {log}\nexit "${{FAKE_SCONTROL_RC:-0}}"\n')
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    for var in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SHARDTRAIN_MAX_REQUEUES"):
        monkeypatch.delenv(var, raising=False)
    return log


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_requeue_outside_slurm(fake_scontrol, caplog):
    assert PreemptionHandler().requeue() is False
    assert _calls(fake_scontrol) == []
    assert "SLURM_JOB_ID is not set" in caplog.text


@pytest.mark.parametrize("count,expected", [(None, True), ("", True), ("0", True), ("2", True),
                                            ("3", False), ("5", False)])
def test_requeue_decision(fake_scontrol, monkeypatch, caplog, count, expected):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    if count is not None:
        monkeypatch.setenv("SLURM_RESTART_COUNT", count)
    assert PreemptionHandler(max_requeues=3).requeue() is expected
    assert _calls(fake_scontrol) == (["requeue 123"] if expected else [])
    if not expected:
        assert "reached the limit" in caplog.text


def test_requeue_env_limit_wins(fake_scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SHARDTRAIN_MAX_REQUEUES", "1")
    assert PreemptionHandler(max_requeues=5).requeue() is False
    monkeypatch.setenv("SHARDTRAIN_MAX_REQUEUES", "2")
    assert PreemptionHandler(max_requeues=0).requeue() is True


def test_requeue_zero_limit(fake_scontrol, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    assert PreemptionHandler(max_requeues=0).requeue() is False
    assert _calls(fake_scontrol) == []


def test_requeue_scontrol_failure(fake_scontrol, monkeypatch, caplog):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("FAKE_SCONTROL_RC", "1")
    assert PreemptionHandler().requeue() is False
    assert _calls(fake_scontrol) == ["requeue 77"]
    assert "exited 1" in caplog.text


def test_requeue_without_scontrol(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert PreemptionHandler().requeue() is False
    assert "not on PATH" in caplog.text


def test_requeue_survives_sigterm_from_slurm(tmp_path, monkeypatch):
    """Slurm kills the job (SIGTERM to every process of the step, scontrol included) as soon as
    it accepts the requeue; scontrol must still exit 0 so that rank 0 knows it worked."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text('#!/bin/bash\nkill -TERM $$\nsleep 0.2\necho ok\n')
    (bindir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SHARDTRAIN_MAX_REQUEUES", raising=False)
    assert PreemptionHandler().requeue() is True


# ---------------------------------------------------------------------------- issue 13
_SECOND = textwrap.dedent("""\
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    from shardtrain.runtime import preempt
    preempt.SECOND_SIGNAL_AFTER_S = {grace}
    h = preempt.PreemptionHandler()
    h.install()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)   # the same event twice (scancel + torchrun): still running
    print("after duplicate", h.signalled, flush=True)
    time.sleep({grace} + 0.05)
    os.kill(os.getpid(), signal.SIGINT)    # a real second signal: stop at once
    print("not reached", flush=True)
""")


@pytest.mark.parametrize("grace", [0.2])
def test_second_signal_stops_at_once(grace):
    p = subprocess.run([sys.executable, "-c", _SECOND.format(repo=str(REPO), grace=grace)],
                       capture_output=True, text=True, timeout=60)
    assert "after duplicate True" in p.stdout and "not reached" not in p.stdout
    assert p.returncode == 128 + signal.SIGINT, (p.returncode, p.stderr)
    assert "second signal" in p.stderr


_EARLY = textwrap.dedent("""\
    import os, runpy, signal, sys
    sys.path.insert(0, {repo!r})
    class Hook:  # a SIGUSR2 exactly when the worker starts importing torch (the slow start-up)
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGUSR2)
            return None
    sys.meta_path.insert(0, Hook())
    sys.argv = ["worker", "--run-dir", {missing!r}]
    try:
        runpy.run_module("shardtrain.runtime.worker", run_name="__main__")
    except BaseException as e:
        print("worker stopped:", type(e).__name__, flush=True)
    from shardtrain.runtime import preempt
    print("kept", preempt._SHARED is not None and preempt._SHARED.signalled, flush=True)
""")


def test_signal_during_startup_is_not_lost(tmp_path):
    env = {**os.environ}
    env.pop("SHARDTRAIN_PREEMPT_SIGNAL", None)
    p = subprocess.run([sys.executable, "-c", _EARLY.format(repo=str(REPO), missing=str(tmp_path / "nope"))],
                       capture_output=True, text=True, timeout=120, env=env)
    assert "kept True" in p.stdout, (p.returncode, p.stdout, p.stderr[-2000:])


def test_exit_code_is_distinct():
    from shardtrain.exitcodes import EXIT_PREEMPTED
    from shardtrain.launcher import cli as launch_cli
    assert EXIT_PREEMPTED not in (0, 1, 2, 124) and EXIT_PREEMPTED < 128
    assert str(EXIT_PREEMPTED) in launch_cli.__doc__  # documented where users read exit codes


def test_signals_after_the_stop_checkpoint_are_ignored():
    """After the agreed stop was saved (then `scontrol requeue` makes Slurm send SIGTERM), a signal must
    not turn the orderly exit into an abrupt one."""
    from shardtrain.runtime import preempt
    h = preempt.PreemptionHandler(("USR1",))
    h.install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        h._first_at -= 10 * preempt.SECOND_SIGNAL_AFTER_S  # as if the save took a while
        h.mark_saved()
        os.kill(os.getpid(), signal.SIGUSR1)  # would os._exit without mark_saved
        assert h.signalled
    finally:
        h.uninstall()
