"""Issue 22: one line before a C++ op is JIT-compiled (runtime/opbuild.py), from the process that
compiles it; nothing for an op that is already built."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import os, sys
from shardtrain.runtime import opbuild
from torch.utils import cpp_extension as ce
from torch.utils.file_baton import FileBaton
calls = []
# what torch would run (ninja + the compiler) is replaced by a stub: the test checks what is said first
original = ce._write_ninja_file_and_build_library
ce._write_ninja_file_and_build_library = lambda *a, **k: calls.append(k["name"])
assert opbuild.install() and opbuild.install()  # idempotent
d = sys.argv[1]
src = os.path.join(d, "op.cpp")
open(src, "w").write("int x;")
ce._write_ninja_file_and_build_library(name="cpu_adam", sources=[src], build_directory=d)   # no library yet
open(os.path.join(d, "cpu_adam.so"), "w").close()
os.utime(src, (1, 1))
ce._write_ninja_file_and_build_library(name="cpu_adam", sources=[src], build_directory=d)   # built: silent
FileBaton(os.path.join(d, "lock")).wait()  # another process holds the build lock (released at once here)
print("CALLS", calls)
'''


def test_compile_is_announced_once_and_a_built_op_is_silent(tmp_path):
    env = {**os.environ, "RANK": "3"}
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "CALLS ['cpu_adam', 'cpu_adam']" in r.stdout  # torch's build still runs both times
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[shardtrain]")]
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("[shardtrain] rank 3: compiling the C++ op cpu_adam") and str(tmp_path) in lines[0]
    assert lines[1].startswith("[shardtrain] rank 3: waiting for another process to finish compiling")


def test_needs_build():
    from shardtrain.runtime.opbuild import needs_build
    here = Path(__file__)
    assert needs_build("nope", [str(here)], str(here.parent))


@pytest.mark.multiproc
def test_a_built_deepspeed_op_loads_without_a_word():
    """The real path: DeepSpeed's CPUAdamBuilder.load() through torch's _jit_compile, with the op already
    built (make test builds it into <venv>/torch_extensions): the wrapper is called and says nothing."""
    ext = Path(sys.prefix) / "torch_extensions"
    if not (ext / "cpu_adam").is_dir():
        pytest.skip("no prebuilt cpu_adam op in this environment")
    code = ("from shardtrain.runtime import opbuild; opbuild.install()\n"
            "from torch.utils import cpp_extension as ce\n"
            "seen = []; wrapped = ce._write_ninja_file_and_build_library\n"
            "ce._write_ninja_file_and_build_library = lambda *a, **k: (seen.append(k['name']), wrapped(*a, **k))[1]\n"
            "from deepspeed.ops.op_builder import CPUAdamBuilder\n"
            "CPUAdamBuilder().load(); print('LOADED', seen)")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(ext)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "LOADED ['cpu_adam']" in r.stdout, r.stdout + r.stderr[-3000:]  # via the wrapper
    assert "compiling the C++ op" not in r.stderr and "waiting for another process" not in r.stderr
