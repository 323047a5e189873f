"""A real two-node Slurm cluster on this machine, for the real-scheduler tests.

``slurm_cluster`` (session-scoped fixture) starts munged, slurmctld and two slurmd (nodes ``n1``
and ``n2``, ``MULTIPLE_SLURMD``), all listening on loopback only, waits until both nodes are idle,
and tears everything down at the end of the session: jobs cancelled, daemons stopped by PID file
(checked with ``ps -o stat=``, since daemons re-parented to PID 1 may stay zombies), and
``/etc/slurm/slurm.conf``, ``/etc/slurm/gres.conf`` and ``/etc/hosts`` restored.

It installs nothing (``.ci/install-slurm.sh`` does). It skips, with the reason, when not root or
when a Slurm/munge binary is missing -- except with ``CI=true``, where a missing Slurm fails the
tests instead (they must run in CI).

Use it from a test module with ``from tests.slurm_cluster import slurm_cluster`` (or
``pytest_plugins``); ``SlurmCluster`` has helpers to submit, wait with timeouts and read job state.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

__all__ = ["SlurmCluster", "slurm_cluster", "cluster_unavailable_reason"]

SLURM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = Path("/etc/slurm/gres.conf")
HOSTS = Path("/etc/hosts")
MUNGE_KEY = Path("/etc/munge/munge.key")
HOSTS_MARK = "# shardtrain-slurm-test"
#: Describes the cluster currently started by this module (to clean up after a crashed session).
RECORD = Path("/run/shardtrain-slurm-cluster.json") if Path("/run").is_dir() else Path(
    tempfile.gettempdir(), "shardtrain-slurm-cluster.json")
NODES = ("n1", "n2")
CPUS_PER_NODE = 8
GPUS_PER_NODE = 2
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "squeue", "sinfo",
            "scancel")
DAEMON_NAMES = {"munged", "slurmctld", "slurmd"}


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin", name), Path("/sbin", name)) if p.exists()), None)


def cluster_unavailable_reason() -> Optional[str]:
    """Why a local cluster cannot be started here, or None."""
    if os.name != "posix" or os.geteuid() != 0:
        return "real-scheduler tests need root (they start slurmctld/slurmd/munged and edit /etc/hosts)"
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        return (f"Slurm/munge binaries missing: {', '.join(missing)} "
                "(run .ci/install-slurm.sh as root)")
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _run(cmd: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _proc_state(pid: int) -> Optional[str]:
    """``ps -o stat=`` of pid: None when gone, ``Z…`` for a zombie."""
    proc = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True)
    state = proc.stdout.strip()
    return state or None


def _alive(pid: int) -> bool:
    state = _proc_state(pid)
    return state is not None and not state.startswith("Z")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _read_pid(pid_file: Path) -> Optional[int]:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop_pid(pid: int, name: str, timeout: float = 15.0) -> None:
    """SIGTERM, wait (reaping if it is our child), then SIGKILL. Only if it is `name`."""
    if not _alive(pid) or _comm(pid)[:15] != name[:15]:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        if not _alive(pid):
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)


@dataclass
class SlurmCluster:
    """A running local cluster; helpers for tests."""

    root: Path
    hostname: str
    address: str = "127.0.0.1"
    nodes: tuple[str, ...] = NODES
    cpus_per_node: int = CPUS_PER_NODE
    gpus_per_node: int = 0
    pid_files: dict[str, Path] = field(default_factory=dict)
    _backups: dict[str, Optional[bytes]] = field(default_factory=dict)
    _started: bool = False

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def start(cls, fake_gpus: bool = True, timeout: float = 90.0) -> "SlurmCluster":
        _cleanup_previous()
        root = Path(tempfile.mkdtemp(prefix="shardtrain-slurm-"))
        root.chmod(0o755)
        cluster = cls(root=root, hostname=socket.gethostname().split(".")[0])
        try:
            cluster._start(fake_gpus, timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self, fake_gpus: bool, timeout: float) -> None:
        self._started = True
        for d in ("state", "spool", "log", "munge", "dev"):
            (self.root / d).mkdir()
        for node in self.nodes:
            (self.root / "spool" / node).mkdir()
        RECORD.write_text(json.dumps({"root": str(self.root), "pid_files": {}}))
        atexit.register(self.stop)
        self._backup(SLURM_CONF)
        self._backup(GRES_CONF)
        self._backup(HOSTS)

        # /etc/hosts: node names resolve to loopback (scontrol show hostnames | head -n1 etc.)
        lines = [ln for ln in HOSTS.read_text().splitlines() if HOSTS_MARK not in ln]
        lines.append(f"{self.address} {' '.join(self.nodes)} {HOSTS_MARK}")
        HOSTS.write_text("\n".join(lines) + "\n")

        self._start_munge()
        if fake_gpus:
            self.gpus_per_node = self._fake_gpus()
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SLURM_CONF.write_text(self._slurm_conf())
        if self.gpus_per_node:
            GRES_CONF.write_text(self._gres_conf())
        elif GRES_CONF.exists():
            GRES_CONF.unlink()

        self.pid_files["slurmctld"] = self.root / "slurmctld.pid"
        self._record()
        _run([_which("slurmctld"), "-i"], timeout=30)
        self._wait_pid_file("slurmctld", timeout)
        for node in self.nodes:
            self.pid_files[f"slurmd-{node}"] = self.root / f"slurmd-{node}.pid"
            self._record()
            _run([_which("slurmd"), "-N", node], timeout=30)
        for node in self.nodes:
            self._wait_pid_file(f"slurmd-{node}", timeout)
        self._wait_idle(timeout)

    def _backup(self, path: Path) -> None:
        self._backups[str(path)] = path.read_bytes() if path.exists() else None
        rec = json.loads(RECORD.read_text())
        rec.setdefault("backups", {})[str(path)] = (
            None if self._backups[str(path)] is None else str(self._save_backup(path)))
        RECORD.write_text(json.dumps(rec))

    def _save_backup(self, path: Path) -> Path:
        dst = self.root / "backup" / path.name
        dst.parent.mkdir(exist_ok=True)
        shutil.copy2(path, dst)
        return dst

    def _record(self) -> None:
        rec = json.loads(RECORD.read_text())
        rec["pid_files"] = {k: str(v) for k, v in self.pid_files.items()}
        RECORD.write_text(json.dumps(rec))

    def _start_munge(self) -> None:
        mdir = self.root / "munge"
        shutil.chown(mdir, "munge", "munge")
        mdir.chmod(0o755)  # munged requires the socket directory to be executable by all
        if not MUNGE_KEY.exists():
            MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
            MUNGE_KEY.write_bytes(os.urandom(1024))
            shutil.chown(MUNGE_KEY, "munge", "munge")
            MUNGE_KEY.chmod(0o400)
        self.pid_files["munged"] = mdir / "munged.pid"
        self._record()
        _run(["runuser", "-u", "munge", "--", _which("munged"),
              f"--socket={mdir}/munge.socket", f"--pid-file={mdir}/munged.pid",
              f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munge.seed"], timeout=30)
        self._wait_pid_file("munged", 30)
        deadline = time.monotonic() + 30
        while not (mdir / "munge.socket").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("munged did not create its socket")
            time.sleep(0.1)

    def _fake_gpus(self) -> int:
        """Character devices standing in for GPUs (gres.conf rejects plain files)."""
        try:
            for i in range(GPUS_PER_NODE):
                dev = self.root / "dev" / f"fakegpu{i}"
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # like /dev/null
        except OSError:
            return 0
        return GPUS_PER_NODE

    def _slurm_conf(self) -> str:
        r = self.root
        socks, cores = 1, self.cpus_per_node
        gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
        lines = [
            "# generated by tests/slurm_cluster.py -- removed when the test session ends",
            "ClusterName=shardtrain-test",
            f"SlurmctldHost={self.hostname}({self.address})",
            "CommunicationParameters=EnableIPv6,NoCtldInAddrAny,NoInAddrAny",
            "SlurmctldPort=6817",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.socket,cred_expire=5",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/log/jobcomp.txt",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=256",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "KillWait=5",
            "MinJobAge=600",
            "SlurmdTimeout=60",
            "InactiveLimit=0",
            "SlurmdParameters=config_overrides",
        ]
        if self.gpus_per_node:
            lines.append("GresTypes=gpu")
        for i, node in enumerate(self.nodes):
            lines.append(
                f"NodeName={node} NodeHostname={self.hostname} NodeAddr={self.address} "
                f"Port={6818 + i} CPUs={self.cpus_per_node} Boards=1 SocketsPerBoard={socks} "
                f"CoresPerSocket={cores} ThreadsPerCore=1 RealMemory=8192{gres} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _gres_conf(self) -> str:
        files = f"{self.root}/dev/fakegpu[0-{self.gpus_per_node - 1}]"
        return "".join(f"NodeName={n} Name=gpu File={files}\n" for n in self.nodes)

    def _wait_pid_file(self, name: str, timeout: float) -> int:
        path = self.pid_files[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid(path)
            if pid and _alive(pid):
                return pid
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not start (no live pid in {path}); logs: {self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            proc = _run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=15)
            states = proc.stdout.strip()
            got = dict(ln.split() for ln in states.splitlines() if len(ln.split()) == 2)
            if all(got.get(n, "").startswith("idle") for n in self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout:g} s: {states!r}; logs: {self.logs()}")

    def stop(self) -> None:
        """Cancel jobs, stop daemons, restore files. Safe to call twice."""
        if not self._started:
            return
        self._started = False
        try:
            if any(_read_pid(p) for k, p in self.pid_files.items() if k.startswith("slurm")):
                _run(["scancel", "--full", "--quiet", "--user", "root"], check=False, timeout=15)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    q = _run(["squeue", "-h", "-o", "%i"], check=False, timeout=10)
                    if q.returncode != 0 or not q.stdout.strip():
                        break
                    time.sleep(0.5)
        except (subprocess.TimeoutExpired, OSError):
            pass
        order = [k for k in self.pid_files if k.startswith("slurmd-")] + ["slurmctld", "munged"]
        for key in order:
            path = self.pid_files.get(key)
            pid = _read_pid(path) if path else None
            if pid:
                _stop_pid(pid, key.split("-")[0])
        _kill_stray_stepds(self.root)
        _restore_files(self._backups)
        try:
            RECORD.unlink()
        except OSError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers for tests --------------------------------------------------------------------

    def logs(self, tail: int = 30) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")) + [self.root / "munge" / "munged.log"]:
            try:
                lines = f.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            out.append(f"== {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def sbatch(self, script: Path, *args: str, env: Optional[dict] = None, cwd=None) -> str:
        proc = _run(["sbatch", "--parsable", *args, str(script)], env=env, cwd=cwd, timeout=30)
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts, NodeList, …)."""
        proc = _run(["scontrol", "show", "job", "-o", job_id], check=False, timeout=15)
        info: dict[str, str] = {}
        for m in re.finditer(r"(\w[\w:/]*)=(\S*)", proc.stdout):
            info.setdefault(m.group(1), m.group(2))
        return info

    def state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_state(self, job_id: str, states: set[str], timeout: float, poll: float = 0.5) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:g} s (wanted {states})")

    def wait_done(self, job_id: str, timeout: float) -> str:
        """Wait for a final state (polling: ``sbatch --wait`` notices ~10 s late)."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                 "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
        try:
            return self.wait_state(job_id, final, timeout)
        except TimeoutError:
            _run(["scancel", "--full", job_id], check=False, timeout=15)
            raise

    def cancel(self, job_id: str) -> None:
        _run(["scancel", "--full", job_id], check=False, timeout=15)


def _kill_stray_stepds(root: Path) -> None:
    """slurmstepd processes of our nodes that outlived slurmd (matched by our spool dir)."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        try:
            if (proc_dir / "comm").read_text().strip() != "slurmstepd":
                continue
            cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (proc_dir / "environ").read_bytes()
        except OSError:
            continue
        if str(root) in cmdline or str(root).encode() in environ:
            # slurmstepd's cmdline is just "slurmstepd: [job.step]"; it is ours if our
            # cluster is the only one (the record guarantees it); be conservative anyway
            _stop_pid(int(proc_dir.name), "slurmstepd", timeout=5)


def _restore_files(backups: dict[str, Optional[bytes]]) -> None:
    for path_str, content in backups.items():
        path = Path(path_str)
        try:
            if path == HOSTS:
                # only our marked line; keep anything else edited meanwhile
                lines = [ln for ln in HOSTS.read_text().splitlines() if HOSTS_MARK not in ln]
                HOSTS.write_text("\n".join(lines) + "\n")
            elif content is None:
                if path.exists():
                    path.unlink()
            else:
                path.write_bytes(content)
        except OSError:
            pass


def _cleanup_previous() -> None:
    """Stop a cluster left behind by a crashed session (from RECORD), restore its files."""
    if not RECORD.exists():
        return
    try:
        rec = json.loads(RECORD.read_text())
    except (OSError, ValueError):
        RECORD.unlink(missing_ok=True)
        return
    for key, path in rec.get("pid_files", {}).items():
        pid = _read_pid(Path(path))
        if pid:
            _stop_pid(pid, key.split("-")[0])
    backups: dict[str, Optional[bytes]] = {}
    for path, saved in rec.get("backups", {}).items():
        if saved is None:
            backups[path] = None
        elif Path(saved).exists():
            backups[path] = Path(saved).read_bytes()
    _restore_files(backups)
    if rec.get("root"):
        shutil.rmtree(rec["root"], ignore_errors=True)
    RECORD.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running two-node cluster (skips outside CI when unavailable; fails in CI)."""
    reason = cluster_unavailable_reason()
    if reason:
        if _in_ci():
            pytest.fail(f"CI=true but the Slurm cluster cannot start: {reason}", pytrace=False)
        pytest.skip(reason)
    cluster = SlurmCluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
