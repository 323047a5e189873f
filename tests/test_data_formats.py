"""Chat `messages` (assistant-only labels, token by token), parquet / arrow / `datasets` directories,
validation before any worker starts, and the custom --gpu-memory label (issue 12)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardtrain.cli import main
from shardtrain.config.schema import ConfigError, parse_run_config
from shardtrain.launcher.datacheck import validate_training_data
from shardtrain.runtime import chat
from shardtrain.runtime.data import IGNORE, build_datasets, load_tokenizer, read_documents, tokenize

ROOT = Path(__file__).resolve().parents[1]
CONV = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a red fruit."},
        {"role": "assistant", "content": "An apple."}, {"role": "user", "content": "And a yellow one?"},
        {"role": "assistant", "content": "A banana."}]
ROWS = [{"messages": CONV}, {"prompt": "Q: two plus two?", "completion": " four"}, {"text": "Ada went home."}]


@pytest.fixture(scope="module")
def tok():
    t = load_tokenizer(None, None)
    chat.apply_template(t, "default")
    return t


def test_chat_labels_are_the_assistant_turns_token_by_token(tok):
    (ids, labels), = tokenize(tok, [(CONV, "chat")])
    text = tok.apply_chat_template(CONV, tokenize=False)
    # expected spans found independently: each reply as the template writes it (content + EOS)
    spans, pos = [], 0
    for m in CONV:
        if m["role"] == "assistant":
            piece = m["content"] + tok.eos_token
            start = text.index("<|assistant|>\n" + piece, pos) + len("<|assistant|>\n")
            spans.append((start, start + len(piece)))
            pos = start
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == len(ids) == len(labels)
    for i, (tid, lab, (s, _)) in enumerate(zip(ids, labels, offsets)):
        inside = any(a <= s < b for a, b in spans)
        assert lab == (tid if inside else IGNORE), (i, tok.decode([tid]), lab)
    learned = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert learned == "An apple." + tok.eos_token + "A banana." + tok.eos_token
    assert "red fruit" not in learned and "Answer" not in learned


def test_chat_without_a_template_names_the_key(tmp_path):
    bare = load_tokenizer(None, None)  # the bundled tokenizer ships no chat template
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"messages": CONV}) + "\n")
    with pytest.raises(chat.ChatTemplateError, match="data.chat_template"):
        build_datasets(bare, train_path=str(f), eval_path=None, eval_fraction=0, fmt="auto", packing=False,
                       seq_len=64)


def _arrow_stream(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


def test_parquet_arrow_and_datasets_directory(tmp_path, tok):
    table = pa.table({k: [r.get(k) for r in ROWS] for k in ("messages", "prompt", "completion", "text")})
    pq.write_table(table, tmp_path / "d.parquet")
    _arrow_stream(tmp_path / "d.arrow", table)
    try:  # a directory written by the real `datasets` when installed, else its documented layout
        import datasets
        datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    except ImportError:
        (tmp_path / "ds").mkdir()
        _arrow_stream(tmp_path / "ds" / "data-00000-of-00001.arrow", table)
        (tmp_path / "ds" / "state.json").write_text(json.dumps(
            {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    want = read_documents(_jsonl(tmp_path / "d.jsonl", ROWS))
    assert want[0][1] == "chat" and want[1] == ("Q: two plus two?", " four") and want[2] == ("Ada went home.", None)
    for src in ("d.parquet", "d.arrow", "ds"):
        assert read_documents(tmp_path / src) == want, src
    train, _ = build_datasets(tok, train_path=str(tmp_path / "d.parquet"), eval_path=None, eval_fraction=0,
                              fmt="auto", packing=False, seq_len=256)
    assert [s[1] for s in train.samples] == [e[1] for e in tokenize(tok, want)]


def test_hub_dataset_id_from_the_local_cache(tmp_path, monkeypatch):
    """huggingface_hub's cache layout for `hf download --repo-type dataset acme/chat`."""
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "datasets--acme--chat"
    (repo / "snapshots" / sha / "data").mkdir(parents=True)
    pq.write_table(pa.table({"messages": [CONV, CONV]}), repo / "snapshots" / sha / "data" / "train-00000.parquet")
    pq.write_table(pa.table({"text": ["held out"]}), repo / "snapshots" / sha / "data" / "test-00000.parquet")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    from shardtrain.config.hub import dataset_source
    docs = read_documents(dataset_source("acme/chat"))  # resolved before the ranks start (emit/runtime.py)
    assert len(docs) == 2 and docs[0][1] == "chat"  # the train split only
    validate_training_data(_cfg("acme/chat", chat_template="default"))
    with pytest.raises(ConfigError, match="hf download --repo-type dataset acme/other"):
        validate_training_data(_cfg("acme/other"))


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(train: str, **data) -> object:
    return parse_run_config({"model": {"name": "tiny-llama"}, "data": {"train": train, **data}})


def test_validation_one_line_and_fix(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [{"messages": CONV}])
    validate_training_data(_cfg(str(good), chat_template="default"))
    cases = {
        "no_template": (good, {}, "data.chat_template"),
        "bad_key": (_jsonl(tmp_path / "k.jsonl", [{"txt": "x"}]), {}, "'messages'"),
        "bad_json": (tmp_path / "j.jsonl", {}, "not valid JSON"),
        "no_reply": (_jsonl(tmp_path / "u.jsonl", [{"messages": CONV[:2]}]), {"chat_template": "default"},
                     "no assistant message"),
        "missing": (tmp_path / "nope.parquet", {}, "no such file or directory"),
        "bad_parquet": (tmp_path / "x.parquet", {}, "cannot be read as parquet"),
    }
    (tmp_path / "j.jsonl").write_text('{"text": "a"}\n{oops\n')
    (tmp_path / "x.parquet").write_text("not parquet")
    for name, (path, data, needle) in cases.items():
        with pytest.raises(ConfigError) as e:
            validate_training_data(_cfg(str(path), **data))
        msg = str(e.value)
        assert needle in msg and "\n" not in msg and msg.startswith("data.") and "fix" in msg, (name, msg)


def test_launch_refuses_bad_data_before_any_worker(tmp_path, capsys):
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"question": "?"}])
    run_dir = tmp_path / "run"
    code = main(["launch", str(ROOT / "configs/examples/tiny-cpu.yaml"), "--set", f"data.train={bad}",
                 "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 1 and f"{bad}:2" in err and "messages" in err
    assert not run_dir.exists()  # nothing written, nothing spawned


def test_custom_gpu_memory_is_not_shown_under_a_preset_name(capsys):
    main(["plan", "--model", "llama-3.2-1b", "--gpu-memory", "24GiB", "--gpus-per-node", "1"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("hardware"))
    assert "custom GPU" in line and "24.0 GiB" in line
    main(["plan", "--model", "llama-3.2-1b", "--gpu", "a100-40gb", "--gpus-per-node", "1"])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("hardware"))
    assert "a100-40gb" in line and "custom" not in line
