"""Validate the training data before any worker starts (a bad record found 10 s into a multi-rank
start-up, once per rank, costs more than reading a few records here).

Reads the first records of data.train / data.eval with the runtime's own reader (runtime/records.py,
torch-free), so what passes here parses the same way in the workers; chat data also needs a chat
template: `data.chat_template`, or one shipped with the tokenizer (tokenizer_config.json
"chat_template" or chat_template.jinja, where transformers looks for it).
"""
from __future__ import annotations

import json
from pathlib import Path

from shardtrain import demo_corpus
from shardtrain.config.schema import ConfigError

FIRST_RECORDS = 64


def validate_training_data(cfg) -> None:
    """Raise ConfigError (one line: key, file, problem, fix) if the data cannot be trained on."""
    from shardtrain.config import hub
    from shardtrain.runtime import chat, records
    data = cfg.data
    if not data.train:  # issue 22: never the bundled demo corpus without naming it
        raise ConfigError(f"data.train is not set: nothing to train on; fix: {demo_corpus.NO_DATA_FIX}")
    chat_seen = False
    for key, path in (("data.train", data.train), ("data.eval", data.eval)):
        if not path:
            continue
        try:
            src = hub.dataset_source(path)  # a cached Hub dataset id -> its snapshot directory
        except FileNotFoundError:
            where = "" if Path(path).expanduser().is_absolute() else f" (relative to {Path.cwd()})"
            raise ConfigError(f"{key}: no such file or directory: {path!r}{where}; fix: check the path, or give a "
                              ".jsonl/.parquet/.arrow file, a `datasets` save_to_disk directory, a cached Hub dataset "
                              "id or a text file") from None
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
        try:
            docs = records.read_documents(src, data.format, limit=FIRST_RECORDS)
        except (records.DataFormatError, UnicodeDecodeError, OSError) as e:
            raise ConfigError(f"{key}: {_one_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - e.g. pyarrow on a corrupt file: still one line, not a traceback
            kind = records.detect_format(src, data.format)
            raise ConfigError(f"{key}: {path}: cannot be read as {kind} "
                              f"({type(e).__name__}: {_one_line(e)}); fix: check the file or set data.format") from None
        if not docs:
            raise ConfigError(f"{key}: {path} has no records; fix: point it at the training data")
        chat_seen |= any(d[1] == records.CHAT for d in docs)
    if chat_seen:
        try:
            template = chat.resolve_template(getattr(data, "chat_template", None))
        except chat.ChatTemplateError as e:
            raise ConfigError(str(e)) from None
        if template is None and not _tokenizer_has_template(cfg):
            raise ConfigError(f"data.train has chat 'messages' but the tokenizer has no chat template; "
                              f"fix: {chat.FIX}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _tokenizer_has_template(cfg) -> bool:
    for d in (cfg.model.tokenizer, cfg.model.name):
        if not d or not Path(d).is_dir():
            continue
        p = Path(d)
        if (p / "chat_template.jinja").is_file() or (p / "chat_template.json").is_file():
            return True
        tc = p / "tokenizer_config.json"
        if tc.is_file():
            try:
                return bool(json.loads(tc.read_text()).get("chat_template"))
            except (OSError, ValueError):
                return False
    return False  # the bundled tokenizer has none
