"""Crash-safe checkpoint directories: the file-system half of :mod:`shardtrain.runtime.checkpoint`.

Layout under ``<run dir>/checkpoints/``::

    .tmp_step_N/     being written (engines write here); a crash leaves only this, swept on the next save
    step_N/          renamed from .tmp_step_N after every file is written and fsynced; holds
                     MANIFEST.json (every file's relative path, size and content digest) and, written
                     LAST, COMPLETE
    latest           text "step_N", replaced atomically (write temp, fsync, rename) after COMPLETE

A checkpoint counts only when COMPLETE exists, MANIFEST.json parses, every listed file exists with
its recorded size (a truncated file or a missing shard fails this), every file's bytes hash to the
digest recorded at save (same-size damage fails this: issue 21) and trainer_state.json parses.
Resume takes the newest checkpoint that passes; each one that fails is skipped with ONE warning line
(rank 0) naming the file.

Digests (issue 21): each file's XXH3-64, taken while the file is written (runtime/ckpt_digest.py's
writers; the algorithm and its measured cost: runtime/ckpt_hash.py). Each rank lists the files it wrote
in ``.digests/rank{R}.json`` inside the temporary directory; rank 0 merges them into the manifest when
sealing (a file no writer hashed is read back there and listed under "hashed_after_write").

Why temp + fsync + rename: rename(2) is atomic within a file system, and fsync of the files
and then of the directory orders the data before the name (POSIX rename; ext4/xfs "data=ordered"
do not guarantee this without fsync — see the LWN article "ext4 and data loss", 2009).
No torch, no process groups here: every function is plain file I/O on one rank.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from shardtrain.rundir_format import (CHECKPOINTS, COMPLETE, DIGESTS_DIR, LATEST, MANIFEST,  # noqa: F401
                                      MANIFEST_ALGORITHM, MANIFEST_DIGESTS, MANIFEST_FILES, MANIFEST_REHASHED,
                                      TMP_PREFIX, TRAINER_STATE, checkpoint_dir, step_of)
from shardtrain.runtime.ckpt_hash import (DIGEST_ALGORITHM, HashingWriter, hash_file,  # noqa: F401
                                          manifest_for, read_rank_digests, share_of, write_rank_digests)
from shardtrain.runtime.faults import TEST_FREE_BYTES_ENV  # TEST-ONLY hook (all in runtime/faults.py)

log = logging.getLogger("shardtrain.checkpoint")


def fsync_path(p: Path) -> None:
    """fsync a file or a directory (directories: makes a rename/creation in it durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if p.is_dir() else 0)
    fd = os.open(p, flags)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories; the data fsyncs still hold
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write text to path via a temp file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def sweep_temporaries(root: Path) -> None:
    """Remove .tmp_step_* left by a save that crashed (rank 0, before a new save)."""
    for d in Path(root).glob(TMP_PREFIX + "*") if Path(root).is_dir() else []:
        shutil.rmtree(d, ignore_errors=True)


def seal(tmp: Path, final: Path) -> None:
    """Rank 0, after every rank finished writing into ``tmp``: manifest (sizes and digests), fsync
    everything, rename to ``final``, then COMPLETE (and the ``latest`` pointer) — in that order."""
    manifest = manifest_for(tmp, read_rank_digests(tmp))
    shutil.rmtree(tmp / DIGESTS_DIR, ignore_errors=True)
    if manifest[MANIFEST_REHASHED]:
        log.info("checkpoint %s: %d file(s) hashed after writing (no streaming writer): %s", final.name,
                 len(manifest[MANIFEST_REHASHED]), ", ".join(manifest[MANIFEST_REHASHED][:5]))
    files = [tmp / rel for rel in manifest[MANIFEST_FILES]]
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=0))
    for p in [*files, tmp / MANIFEST]:
        fsync_path(p)
    for d in sorted({p.parent for p in files} | {tmp}, key=lambda x: -len(x.parts)):
        fsync_path(d)
    if final.exists():  # the same step saved again (e.g. after a resume at that step): replace it
        trash = final.with_name(f"{TMP_PREFIX}old_{final.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(final.parent)
    write_atomic(final / COMPLETE, "")
    write_atomic(final.parent / LATEST, final.name + "\n")


def read_manifest(d: Path) -> tuple[dict | None, str | None]:
    """(manifest, None), (None, None) for a checkpoint written before manifests existed, or (None, why)."""
    mf = Path(d) / MANIFEST
    if not mf.is_file():
        return None, None
    try:
        m = json.loads(mf.read_text())
        assert isinstance(m[MANIFEST_FILES], dict) and isinstance(m.get(MANIFEST_DIGESTS, {}), dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        return None, f"{MANIFEST} unreadable ({type(e).__name__})"
    return m, None


def verify(d: Path, digests: bool = True, share: tuple[int, int] = (0, 1)) -> str | None:
    """None when ``d`` is a complete checkpoint, else why not (one short phrase naming the file).
    Sizes of every file are checked; with ``digests``, the content of this rank's ``share`` (rank,
    world) of the files (:func:`share_of`; (0, 1): all of them)."""
    if not (d / COMPLETE).is_file():
        return f"no {COMPLETE} marker (the save did not finish)"
    try:
        json.loads((d / TRAINER_STATE).read_text())
    except (OSError, ValueError) as e:
        return f"{TRAINER_STATE} unreadable ({type(e).__name__})"
    m, why = read_manifest(d)
    if m is None:
        return why  # None: written before manifests existed, COMPLETE is all there is to check
    files = m[MANIFEST_FILES]
    for rel, size in files.items():
        p = d / rel
        if not p.is_file():
            return f"missing {rel}"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {size} were written (truncated or altered)"
    recorded = m.get(MANIFEST_DIGESTS) or {}
    if not digests or not recorded:
        return None  # a manifest from before digests (sizes only)
    algorithm = m.get(MANIFEST_ALGORITHM, DIGEST_ALGORITHM)
    for rel in share_of(files, *share):
        want = recorded.get(rel)
        if want is None:
            return f"{rel} has no digest in {MANIFEST}"
        got = hash_file(d / rel, algorithm)
        if got != want:
            return f"{rel} is damaged: its bytes hash to {algorithm} {got}, {want} was recorded at save"
    return None


def candidates(run_dir: Path) -> list[tuple[int, Path]]:
    """Every step_N directory under ``<run_dir>/checkpoints``, newest first."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted(((n, d) for d in (root.iterdir() if root.is_dir() else []) if d.is_dir()
                   and (n := step_of(d)) is not None), reverse=True)


def newest_complete(run_dir: Path, warn: bool = True, *, digests: bool = False, share: tuple[int, int] = (0, 1),
                    agree: Callable[[str | None], str | None] | None = None) -> tuple[int, Path] | None:
    """The newest checkpoint that verifies; each newer one that does not is skipped with one warning.

    ``digests``: also hash the files (this rank's ``share``); ``agree``: the ranks' collective that
    turns each rank's verdict into the common one (the first reason any rank found, or None), so all
    ranks take the same checkpoint. Without it the verdict is this process's alone."""
    for n, d in candidates(run_dir):
        why = verify(d, digests=digests, share=share)
        if agree is not None:
            why = agree(why)
        if why is None:
            return n, d
        if warn:
            log.warning("skipping checkpoint %s: %s; resuming from an older one", d, why)
    return None


def complete_steps(root: Path) -> list[tuple[int, Path]]:
    out = []
    for d in root.iterdir() if root.is_dir() else []:
        n = step_of(d)
        if n is not None and d.is_dir() and (d / COMPLETE).is_file():
            out.append((n, d))
    return sorted(out)


def prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; older step dirs (complete or not) go."""
    done = complete_steps(root)
    if len(done) <= keep:
        return
    cutoff = done[-keep][0]
    for d in root.iterdir():
        n = step_of(d)
        if n is not None and n < cutoff:
            shutil.rmtree(d, ignore_errors=True)


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


def free_bytes(root: Path) -> int:
    v = os.environ.get(TEST_FREE_BYTES_ENV)
    if v:
        return int(float(v))
    return shutil.disk_usage(root).free


class CheckpointSpaceError(RuntimeError):
    """Not enough free disk for the next checkpoint (raised on every rank, before writing anything)."""
