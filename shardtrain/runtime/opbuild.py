"""One line before a C++ op is JIT-compiled (issue 22: a DeepSpeed op compiled for ~50 s with no message).

DeepSpeed builds its ops (cpu_adam, the shm all-reduce, ...) on first use through
torch.utils.cpp_extension.load: `_jit_compile` takes a file lock in the op's build directory, and only
the process holding it calls `_write_ninja_file_and_build_library`; the others wait on the lock. We wrap
both: the process that will really compile (no built library yet, or a source newer than it) prints
which op, how long it takes and where the result is cached; a process waiting on another's build says
so. Ops already built (`make test` builds them into <venv>/torch_extensions, launcher/hosts.ops_env) load
without a word. Wrapping a private torch function: if torch renames it, `install` does nothing.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

_INSTALLED: list = []


def _prefix() -> str:
    return f"[shardtrain] rank {os.environ.get('RANK', '0')}:"


def needs_build(name: str, sources, build_directory: str) -> bool:
    """Will ninja compile? True when the op's library is missing or older than one of its sources."""
    lib = Path(build_directory) / f"{name}.so"
    if not lib.is_file():
        return True
    built = lib.stat().st_mtime
    return any(Path(s).is_file() and Path(s).stat().st_mtime > built for s in sources or ())


def _say(text: str) -> None:
    os.write(2, (text + "\n").encode())  # unbuffered: the compile that follows can take a minute


def install() -> bool:
    """Wrap torch's JIT build and lock wait (once per process); False when torch has no such functions."""
    if _INSTALLED:
        return True
    try:
        from torch.utils import cpp_extension as ce
        from torch.utils.file_baton import FileBaton
        build, wait = ce._write_ninja_file_and_build_library, FileBaton.wait
    except (ImportError, AttributeError):
        return False

    @functools.wraps(build)
    def announced_build(*args, **kwargs):
        name = kwargs.get("name", args[0] if args else "?")
        sources = kwargs.get("sources", args[1] if len(args) > 1 else ())
        directory = kwargs.get("build_directory", "")
        if directory and needs_build(name, sources, directory):
            _say(f"{_prefix()} compiling the C++ op {name} (DeepSpeed/torch JIT, once per environment; about a "
                 f"minute on few cores) into {directory}")
        return build(*args, **kwargs)

    @functools.wraps(wait)
    def announced_wait(self, *args, **kwargs):
        _say(f"{_prefix()} waiting for another process to finish compiling a C++ op "
             f"({os.path.dirname(getattr(self, 'lock_file_path', '')) or 'torch extensions'})")
        return wait(self, *args, **kwargs)

    ce._write_ninja_file_and_build_library = announced_build
    FileBaton.wait = announced_wait
    _INSTALLED.append((build, wait))
    return True
