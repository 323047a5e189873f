"""The live console: copy local rank 0's log files to the console while the launch runs.

Bytes are copied as they are (the progress bar's carriage returns work), except tracebacks: from a
"Traceback (most recent call last):" header on, a rank's output is held back, and the failure report
(:mod:`shardtrain.launcher.failure`) prints the traceback of the rank that failed first, once.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from shardtrain.compiler.specs import Launcher
from shardtrain.launcher.failure import TRACEBACK_MARK, torchrun_attempts, torchrun_rank_logs

if TYPE_CHECKING:
    from shardtrain.launcher.rankstart import LaunchSpec

_TB_ANY = re.compile(rb"(?:\[(?:rank|default)\d+\]: ?)?Traceback \(most recent call last\):")
_PARTIAL_PREFIX = re.compile(rb"\[(?:r(?:a(?:n(?:k\d*\]?)?)?)?|d(?:e(?:f(?:a(?:u(?:l(?:t\d*\]?)?)?)?)?)?)?)?")


def _header_prefix_len(buf: bytes) -> int:
    """Length of the longest tail of ``buf`` that may still grow into a traceback header (held back)."""
    start = max(0, len(buf) - 80)
    for i in range(start, len(buf)):
        if buf[i] not in b"[T":
            continue
        s = buf[i:]
        m = re.match(rb"\[(?:rank|default)\d+\]: ?", s)
        if m:
            if TRACEBACK_MARK.startswith(s[m.end():]):
                return len(s)
        elif _PARTIAL_PREFIX.fullmatch(s) or TRACEBACK_MARK.startswith(s):
            return len(s)
    return 0


class Tail(threading.Thread):
    """Copy local rank 0's log files to the console as they grow; hold back tracebacks."""

    def __init__(self, spec: LaunchSpec, out, err, interval: float = 0.1):
        super().__init__(daemon=True)
        self.spec, self.out, self.err, self.interval = spec, out, err, interval
        self._stop_evt = threading.Event()
        self._pos: dict[Path, int] = {}
        self._state: dict[Path, list] = {}  # path -> [pending bytes, at line start, suppressed]
        self._attempt = None

    def _sources(self) -> list[tuple[Path, object]]:
        d = self.spec.log_dir
        if self.spec.launcher == Launcher.TORCHRUN:
            attempts = torchrun_attempts(d)
            if not attempts:
                return []
            a = attempts[-1]
            if self._attempt is not None and a != self._attempt:
                self._write(self.err, f"\n[shardtrain] torchrun restarted the workers ({a.name})\n".encode())
            self._attempt = a
            logs = torchrun_rank_logs(a, 0)
            return [(logs["stdout"], self.out), (logs["stderr"], self.err)]
        r0 = self.spec.node_rank * self.spec.nproc_per_node
        logs = sorted(d.glob(f"*_rank{r0}.log"))
        return [(logs[-1], self.out)] if logs else []

    @staticmethod
    def _write(stream, data: bytes) -> None:
        try:
            buf = getattr(stream, "buffer", None)
            if buf is not None:
                stream.flush()
                buf.write(data)
                buf.flush()
            else:
                stream.write(data.decode(errors="replace"))
                stream.flush()
        except (ValueError, OSError):
            pass

    def _feed(self, path: Path, stream, data: bytes, final: bool = False) -> None:
        st = self._state.setdefault(path, [b"", False, True])  # [held bytes, traceback seen, at line start]
        if st[1]:
            return
        buf = st[0] + data
        m = _TB_ANY.search(buf)
        if m:  # from here on the failure report speaks (once, for the rank that failed first)
            out = bytearray(buf[:m.start()])
            if (out and not out.endswith(b"\n")) or (not out and not st[2]):
                out += b"\n"  # end a progress bar line
            st[0], st[1] = b"", True
        else:
            hold = 0 if final else _header_prefix_len(buf)
            out, st[0] = buf[:len(buf) - hold], buf[len(buf) - hold:]
        if out:
            st[2] = out.endswith(b"\n")
            self._write(stream, bytes(out))

    def poll(self, final: bool = False) -> None:
        for path, stream in self._sources():
            try:
                with open(path, "rb") as f:
                    f.seek(self._pos.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            if data or final:
                self._pos[path] = self._pos.get(path, 0) + len(data)
                self._feed(path, stream, data, final=final)

    def run(self) -> None:
        while not self._stop_evt.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=2)
        self.poll(final=True)
