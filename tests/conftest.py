import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# no network in tests: a Hub id that is not in the local cache fails at once instead of retrying
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tests import helper modules from tests/ (e.g. tests/slurm_cluster.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))


# ---- global state guard (issue 19): DeepSpeed's ZeRO-3 zero.Init replaces torch.nn.functional.linear
# (deepspeed/runtime/zero/partition_parameters.py InsertPostInitMethodToModuleSubClasses.__enter__ /
# _enable_class: `torch.nn.functional.linear = zero3_linear_wrap`, "This will persist unless manually
# reset") and its CPU comm layer leaves one /dev/shm segment per rank (shardtrain/runtime/dist.py
# _unlink_deepspeed_shm). Both leaked from in-process tests into later ones (test_trace points moved by
# up to 6.5% with test order; ~264 MiB of /dev/shm per run). Each test that leaves F.linear patched is
# recorded and F.linear restored for the next test; a DeepSpeed shm segment that this session's
# processes (pytest and its children) still have linked after a test is recorded. At session end any
# recorded leak fails the session loudly (the segments are removed then).
import pytest  # noqa: E402

try:
    import torch
    _ORIG_LINEAR = torch.nn.functional.linear
except ImportError:  # the planner's tests run without torch
    torch = None
    _ORIG_LINEAR = None

try:  # property tests run the same examples every time (issue 19): a red CI run reproduces locally
    from hypothesis import settings as _hyp_settings
    _hyp_settings.register_profile("shardtrain", derandomize=True)
    _hyp_settings.load_profile("shardtrain")
except ImportError:
    pass

_SHM_DIR = Path("/dev/shm")
_SHM_PREFIX = f"deepspeed_allreduce_buffer_{os.getuid()}_"
_LINEAR_LEAKS: list[str] = []
_OUR_SHM: dict[str, str] = {}   # segment name -> the test after which this session still had it linked


def _descendants(root: int) -> list[int]:
    """This process and its live children (torchrun harnesses run as subprocesses)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, frontier = [root], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _linked_shm_of_session() -> set[str]:
    """DeepSpeed shm segments this session's processes map whose names still exist: a harness that
    started deepspeed.comm and did not unlink after its barrier (unlinked ones read "(deleted)").
    Only this session's processes count: other sessions may run tests on the same machine."""
    names = set()
    for pid in _descendants(os.getpid()):
        try:
            lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if "/dev/shm/" + _SHM_PREFIX in line and not line.endswith("(deleted)"):
                names.add(line.split("/dev/shm/", 1)[1].split()[0])
    return names


@pytest.fixture(autouse=True)
def _global_state_guard(request):
    yield
    if torch is not None and torch.nn.functional.linear is not _ORIG_LINEAR:
        _LINEAR_LEAKS.append(request.node.nodeid)
        torch.nn.functional.linear = _ORIG_LINEAR
    for name in _linked_shm_of_session():
        _OUR_SHM.setdefault(name, request.node.nodeid)


def global_state_leaks() -> list[str]:
    """What the session left behind: tests that left F.linear patched, shm segments it left linked
    (removed here, so one failing run does not fill /dev/shm)."""
    out = [f"torch.nn.functional.linear left patched by {t} (restore it in the harness, as "
           "tests/ds_step.py one_step does)" for t in _LINEAR_LEAKS]
    if torch is not None and torch.nn.functional.linear is not _ORIG_LINEAR:
        out.append("torch.nn.functional.linear is not the original at session end")
    for name in sorted(set(_OUR_SHM) | _linked_shm_of_session()):
        path = _SHM_DIR / name
        if path.exists():
            out.append(f"/dev/shm/{name} left by this session (seen after {_OUR_SHM.get(name, 'the last test')}): "
                       "unlink it where the harness starts deepspeed.comm (shardtrain.runtime.dist._unlink_deepspeed_shm)")
            path.unlink(missing_ok=True)
    return out


def pytest_sessionfinish(session, exitstatus):
    leaks = global_state_leaks()
    if leaks:
        print("\nGLOBAL STATE LEAK (tests/conftest.py guard):\n  " + "\n  ".join(leaks), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
