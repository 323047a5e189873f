"""Training records from the formats users already have; torch-free (the launcher validates with it).

Formats (data.format auto picks by suffix / layout):
- JSONL: `text`, or `prompt` + `completion`, or chat `messages` ([{"role", "content"}, ...], the
  format instruction-tuning datasets and tools use);
- plain text: documents separated by blank lines;
- parquet (.parquet) and Arrow IPC (.arrow, stream or file) tables with the same columns;
- a `datasets` save_to_disk directory (state.json lists its Arrow files, written in the IPC stream
  format by datasets' arrow_dataset.py save_to_disk; a DatasetDict directory has dataset_dict.json
  and one such directory per split: "train" is used);
- a Hub dataset id ORG/NAME[@REV] already in the local Hugging Face cache (its parquet/jsonl/arrow
  files, those with "train" in their path when there are such).
A document is (text, None), (prompt, completion) or (messages, CHAT).
"""
from __future__ import annotations

import json
from pathlib import Path

CHAT = "chat"
ROLES = ("system", "user", "assistant", "tool")
_FIX = "write one record per line as {\"text\": ...}, {\"prompt\": ..., \"completion\": ...} or " \
       "{\"messages\": [{\"role\": \"user\", \"content\": ...}, {\"role\": \"assistant\", \"content\": ...}]}"


class DataFormatError(ValueError):
    """A data file the runtime cannot train on: names the file (and record), the problem and the fix."""


def resolve_source(path: str | Path) -> Path:
    """A local path. Hub dataset ids ORG/NAME[@REV] are resolved to their cached snapshot before the ranks
    start (config/hub.py dataset_source, carried in plan.json's runtime facts)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    raise FileNotFoundError(f"data file {str(p)!r} does not exist")


def _data_files(d: Path) -> list[Path]:
    """Data files of a downloaded dataset snapshot; the train split when the names say so."""
    files = sorted(f for f in d.rglob("*") if f.suffix in (".parquet", ".jsonl", ".arrow") and f.is_file())
    train = [f for f in files if "train" in f.relative_to(d).as_posix()]
    return train or files


def detect_format(path: str | Path, fmt: str = "auto") -> str:
    p = Path(path)
    if fmt != "auto":
        return fmt
    if p.is_dir():
        if not (p / "state.json").is_file() and not (p / "dataset_dict.json").is_file() and _data_files(p):
            return "files"
        return "datasets"
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}.get(p.suffix, "text")


def iter_records(path: str | Path, fmt: str = "auto", limit: int | None = None):
    """Raw records (dicts) of a jsonl/parquet/arrow/datasets source, with a location string each."""
    p = Path(path)
    fmt = detect_format(p, fmt)
    if fmt == "files":  # a Hub dataset snapshot: its data files in order
        n = 0
        for f in _data_files(p):
            for where, rec in iter_records(f, "auto", None if limit is None else limit - n):
                yield where, rec
                n += 1
            if limit is not None and n >= limit:
                return
        return
    if fmt == "jsonl":
        n = 0
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataFormatError(f"{p}:{i}: not valid JSON ({e.msg}); fix: {_FIX}") from None
                yield f"{p}:{i}", rec
                n += 1
                if limit is not None and n >= limit:
                    return
        return
    n = 0
    for table, where in _tables(p, fmt):
        for j, rec in enumerate(table.to_pylist()):
            # a table has every column in every row: a column this row does not use is null
            yield f"{where} row {j}", {k: v for k, v in rec.items() if v is not None}
            n += 1
            if limit is not None and n >= limit:
                return


def _tables(p: Path, fmt: str):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataFormatError(f"{p}: reading {fmt} data needs pyarrow; fix: pip install pyarrow") from None
    if fmt == "parquet":
        yield pq.read_table(p), str(p)
    elif fmt == "arrow":
        yield _read_arrow(pa, p), str(p)
    elif fmt == "datasets":
        d = p
        if (p / "dataset_dict.json").is_file():
            splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
            if "train" not in splits:
                raise DataFormatError(f"{p}: a DatasetDict without a 'train' split (has {splits}); fix: point "
                                      "data.train at one split's directory")
            d = p / "train"
        state = d / "state.json"
        if not state.is_file():
            raise DataFormatError(f"{p}: not a `datasets` save_to_disk directory (no state.json); fix: "
                                  "dataset.save_to_disk(DIR), or give a .jsonl/.parquet/.arrow file")
        for f in json.loads(state.read_text()).get("_data_files", []):
            yield _read_arrow(pa, d / f["filename"]), str(d / f["filename"])
    else:
        raise DataFormatError(f"data.format {fmt!r}: not a table format")


def _read_arrow(pa, path: Path):
    with pa.memory_map(str(path)) as src:
        try:
            return pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            src.seek(0)
            return pa.ipc.open_file(src).read_all()


def to_document(rec, where: str):
    """(text, None) | (prompt, completion) | (messages, CHAT); DataFormatError naming the record."""
    if not isinstance(rec, dict):
        raise DataFormatError(f"{where}: a record must be an object, got {type(rec).__name__}; fix: {_FIX}")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataFormatError(f"{where}: 'messages' must be a non-empty list of {{role, content}}; fix: {_FIX}")
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataFormatError(f"{where}: messages[{k}] needs 'role' and 'content', got "
                                      f"{sorted(m) if isinstance(m, dict) else m!r}; fix: {_FIX}")
            if m["role"] not in ROLES:
                raise DataFormatError(f"{where}: messages[{k}].role {m['role']!r} is not one of {ROLES}; "
                                      "fix: use the OpenAI chat roles")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataFormatError(f"{where}: no assistant message, so nothing to learn (loss is on assistant "
                                  "turns only); fix: add the assistant's reply")
        return ([{"role": m["role"], "content": str(m["content"])} for m in msgs], CHAT)
    if "prompt" in rec and "completion" in rec:
        return (str(rec["prompt"]), str(rec["completion"]))
    if "text" in rec:
        return (str(rec["text"]), None)
    raise DataFormatError(f"{where}: a record needs 'text', 'prompt' and 'completion', or 'messages'; got keys "
                          f"{sorted(rec)}; fix: {_FIX}")


def read_documents(path: str | Path, fmt: str = "auto", limit: int | None = None) -> list[tuple]:
    p = resolve_source(path)
    kind = detect_format(p, fmt)
    if kind == "text":
        docs = [(d.strip(), None) for d in p.read_text().split("\n\n") if d.strip()]
        return docs[:limit] if limit is not None else docs
    return [to_document(rec, where) for where, rec in iter_records(p, kind, limit)]
