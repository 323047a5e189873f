"""Checkpoint digests on the ranks (issue 21): hash every checkpoint file while it is written, and agree
across ranks on the newest checkpoint whose bytes still hash to what was recorded.

Writing: one :class:`Recorder` per save and rank. Its writers hand each buffer to the file and to the
hasher in the same call (:class:`shardtrain.runtime.ckpt_hash.HashingWriter`), so the digest costs one
pass of XXH3 over bytes already in cache, and no second read:

- ``rec.torch_save(obj, path)``: torch.save into the hashing writer (DDP state dicts, RNG states);
- ``rec.write_text(path, text)``: small files (trainer_state.json);
- ``rec.dcp_writer(path)``: a torch.distributed.checkpoint FileSystemWriter whose streams hash (the
  portable model and optimizer state of every engine: runtime/portable.py ``save(..., writer=)``).

``rec.dump(rank)`` leaves the list in the temporary checkpoint directory; rank 0's seal merges the lists
into MANIFEST.json (runtime/ckpt_files.py). A file that none of these wrote is hashed by rank 0 when
sealing (and listed as such in the manifest).

Resume: :func:`latest_verified` is COLLECTIVE: each rank hashes its share of each candidate's files
(ckpt_hash.share_of: every file once, bytes spread evenly), the ranks exchange their verdicts, and all
of them skip a damaged checkpoint together (one warning on rank 0 naming the file). Why shares rather
than each rank hashing the files it will load: which files a rank reads depends on DCP's load plan (a
resume on another world size reshards) and on the engine (every DDP rank loads the same files, W reads
of each); a share per rank checks every file of the checkpoint exactly once whatever the layout, the
bytes spread over the ranks, and the agreement keeps any rank from loading what another found damaged.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from shardtrain.runtime import ckpt_files as files
from shardtrain.runtime.ckpt_hash import HashingWriter, write_rank_digests


class Recorder:
    """The files one rank writes into one temporary checkpoint directory, with their digests."""

    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        self.files: dict[str, list] = {}

    def _rel(self, path) -> str | None:
        try:
            return Path(path).resolve().relative_to(self.tmp.resolve()).as_posix()
        except ValueError:
            return None

    def _done(self, path: Path, size: int, digest: str) -> None:
        rel = self._rel(path)
        if rel is not None:
            self.files[rel] = [size, digest]

    def renamed(self, old, new) -> None:
        rel_old, rel_new = self._rel(old), self._rel(new)
        if rel_old in self.files and rel_new is not None:
            self.files[rel_new] = self.files.pop(rel_old)

    def open(self, path, with_fileno: bool = False) -> HashingWriter:
        return HashingWriter(Path(path), on_close=self._done, with_fileno=with_fileno)

    def torch_save(self, obj, path, **kw) -> None:
        with self.open(path) as f:
            torch.save(obj, f, **kw)

    def write_text(self, path, text: str) -> None:
        with self.open(path) as f:
            f.write(text.encode())

    def dcp_writer(self, path):
        """A torch.distributed.checkpoint FileSystemWriter at ``path`` whose files are hashed as DCP
        streams them (its ``.metadata`` is written to a temporary name and renamed: the record follows)."""
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint.filesystem import FileSystem
        rec = self

        class HashingFileSystem(FileSystem):
            @contextlib.contextmanager
            def create_stream(self, p, mode):
                if "w" not in mode:
                    with super().create_stream(p, mode) as s:
                        yield s
                    return
                w = rec.open(p, with_fileno=True)  # DCP fsyncs through fileno()
                try:
                    yield w
                finally:
                    w.close()

            def rename(self, p, new_path):
                super().rename(p, new_path)
                rec.renamed(p, new_path)

        writer = FileSystemWriter(str(path))
        writer.fs = HashingFileSystem()
        return writer

    def dump(self, rank: int) -> None:
        write_rank_digests(self.tmp, rank, self.files)


def _agree(why: str | None) -> str | None:
    """COLLECTIVE: the first reason any rank found (rank order), or None when every rank's share passed."""
    got: list = [None] * dist.get_world_size()
    dist.all_gather_object(got, why)
    return next((w for w in got if w), None)


def latest_verified(run_dir: Path) -> tuple[int, Path] | None:
    """COLLECTIVE when a process group exists: the newest checkpoint whose sizes and digests verify, the
    same on every rank; each newer one that fails is skipped with one warning (rank 0) naming the file."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return files.newest_complete(run_dir, warn=rank == 0, digests=True, share=(rank, world),
                                     agree=_agree if world > 1 else None)
    return files.newest_complete(run_dir, warn=True, digests=True)
