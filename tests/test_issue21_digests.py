"""Issue 21: checkpoint content digests, file level (one process; the 2-rank runs are in
tests/runtime/test_issue21_integrity.py): the hashing writer, the manifest, verification by shares,
same-size damage, manifests from before digests, and the torch writers (torch.save, DCP)."""
from __future__ import annotations

import io
import json
import os

import pytest

from shardtrain.runtime import ckpt_files as F
from shardtrain.runtime.ckpt_hash import HashingWriter, hash_file, share_of


def _flip(p, at: int | None = None, n: int = 400) -> None:
    b = bytearray(p.read_bytes())
    at = len(b) // 2 if at is None else at
    b[at:at + n] = bytes(x ^ 0xFF for x in b[at:at + n])
    p.write_bytes(bytes(b))


def _checkpoint(root, step: int, files: dict[str, bytes]):
    """A sealed checkpoint whose files were written through HashingWriter (one 'rank')."""
    tmp = root / "checkpoints" / f".tmp_step_{step}"
    tmp.mkdir(parents=True)
    got = {}
    for rel, data in {**files, "trainer_state.json": json.dumps({"step": step}).encode()}.items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        with HashingWriter(tmp / rel, on_close=lambda p, n, h, rel=rel: got.__setitem__(rel, [n, h])) as f:
            f.write(data)
    F.write_rank_digests(tmp, 0, got)
    final = root / "checkpoints" / f"step_{step}"
    F.seal(tmp, final)
    return final


def test_hashing_writer_digest_equals_reading_back(tmp_path):
    p = tmp_path / "f.bin"
    big = os.urandom((3 << 20) + 17)
    with HashingWriter(p) as f:
        f.write(b"head")
        f.write(memoryview(big))
        f.write(bytearray(b"tail"))
        assert f.tell() == 8 + len(big)
        with pytest.raises(OSError, match="sequential"):
            f.seek(0)
        assert f.seek(f.tell()) == f.tell()
        with pytest.raises(io.UnsupportedOperation):
            f.fileno()  # torch.save's legacy format would write around write() when it sees a descriptor
        digest = f.hexdigest()
    assert p.read_bytes() == b"head" + big + b"tail" and hash_file(p) == digest
    with HashingWriter(tmp_path / "g.bin", with_fileno=True) as g:
        os.fsync(g.fileno())


def test_manifest_holds_streamed_digests_and_same_size_damage_is_named(tmp_path):
    d = _checkpoint(tmp_path, 4, {"state/__0_0.distcp": os.urandom(50_000), "rng_rank0.pt": os.urandom(900)})
    m = json.loads((d / "MANIFEST.json").read_text())
    assert m["digest_algorithm"] == "xxh3_64" and m["hashed_after_write"] == []
    assert set(m["digests"]) == set(m["files"]) == {"state/__0_0.distcp", "rng_rank0.pt", "trainer_state.json"}
    assert not (d / ".digests").exists() and F.verify(d) is None
    _flip(d / "state" / "__0_0.distcp")
    assert (d / "state" / "__0_0.distcp").stat().st_size == 50_000
    why = F.verify(d)
    assert why.startswith("state/__0_0.distcp is damaged") and "recorded at save" in why
    assert F.verify(d, digests=False) is None  # sizes alone cannot see it (the finding)


def test_resume_skips_the_damaged_newest_with_one_warning(tmp_path, caplog):
    _checkpoint(tmp_path, 2, {"model.bin": os.urandom(3000)})
    d4 = _checkpoint(tmp_path, 4, {"model.bin": os.urandom(3000)})
    _flip(d4 / "model.bin", n=10)
    with caplog.at_level("WARNING", logger="shardtrain.checkpoint"):
        assert F.newest_complete(tmp_path, digests=True)[0] == 2
    assert len(caplog.records) == 1 and "step_4" in caplog.text and "model.bin is damaged" in caplog.text
    assert F.newest_complete(tmp_path)[0] == 4  # the launcher's quick look: sizes only


def test_shares_cover_every_file_once_and_agreement_decides_for_all(tmp_path):
    files = {f"f{i}": s for i, s in enumerate([900, 10, 500, 500, 30, 1, 700])}
    for world in (1, 2, 3, 8):
        shares = [share_of(files, r, world) for r in range(world)]
        assert sorted(sum(shares, [])) == sorted(files)
        if world == 2:
            loads = [sum(files[f] for f in s) for s in shares]
            assert max(loads) - min(loads) <= 900
    # two "ranks": only the rank whose share holds the damaged file sees it; the agreement skips for both
    _checkpoint(tmp_path, 2, {"a": os.urandom(100)})
    d = _checkpoint(tmp_path, 4, {"a": os.urandom(4000), "b": os.urandom(2000)})
    _flip(d / "b", n=10)
    verdicts = [F.verify(d, share=(r, 2)) for r in range(2)]
    assert sum(v is not None for v in verdicts) == 1
    # what all_gather_object gives each rank: every rank's verdict on the same candidate, newest first
    per_candidate = [[F.verify(c, share=(r, 2)) for r in range(2)] for _, c in F.candidates(tmp_path)]
    for r in range(2):
        calls = iter(per_candidate)
        agree = lambda why, calls=calls: next((w for w in next(calls) if w), None)  # noqa: E731
        assert F.newest_complete(tmp_path, warn=False, digests=True, share=(r, 2), agree=agree)[0] == 2
        assert F.newest_complete(tmp_path, warn=False, digests=True, share=(r, 2))[0] == (4 if verdicts[r] is None
                                                                                          else 2)


def test_manifests_from_before_digests_still_verify_by_size(tmp_path):
    d = tmp_path / "checkpoints" / "step_3"
    d.mkdir(parents=True)
    (d / "model.pt").write_bytes(b"x" * 10)
    (d / "trainer_state.json").write_text("{}")
    (d / "MANIFEST.json").write_text(json.dumps({"files": {"model.pt": 10, "trainer_state.json": 2}}))
    (d / "COMPLETE").write_text("")
    assert F.verify(d) is None
    (d / "model.pt").write_bytes(b"x" * 9)
    assert "truncated" in F.verify(d)


def test_torch_writers_stream_every_file(tmp_path):
    """torch.save, trainer_state and a DCP save (one process) through the Recorder: nothing read back."""
    import torch
    import torch.distributed.checkpoint as dcp
    from shardtrain.runtime.ckpt_digest import Recorder
    tmp = tmp_path / "checkpoints" / ".tmp_step_1"
    tmp.mkdir(parents=True)
    rec = Recorder(tmp)
    sd = {"w": torch.randn(300, 300), "b": torch.randn(7)}
    dcp.save(sd, storage_writer=rec.dcp_writer(tmp / "state"), no_dist=True)
    rec.torch_save({"x": torch.arange(5)}, tmp / "rng_rank0.pt")
    rec.write_text(tmp / "trainer_state.json", json.dumps({"step": 1}))
    rec.dump(0)
    F.seal(tmp, tmp_path / "checkpoints" / "step_1")
    d = tmp_path / "checkpoints" / "step_1"
    m = json.loads((d / "MANIFEST.json").read_text())
    assert m["hashed_after_write"] == [] and "state/.metadata" in m["digests"] and F.verify(d) is None
    out = {"w": torch.zeros(300, 300), "b": torch.zeros(7)}
    dcp.load(out, checkpoint_id=str(d / "state"), no_dist=True)
    assert out["w"].equal(sd["w"]) and torch.load(d / "rng_rank0.pt", weights_only=True)["x"].equal(torch.arange(5))
    _flip(next((d / "state").glob("*.distcp")), n=8)
    assert "is damaged" in F.verify(d)
