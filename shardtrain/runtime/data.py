"""Training data: read → tokenize → pack or pad → deterministic distributed sampling.

Formats: JSONL with `text`, or `prompt` + `completion` (prompt tokens get label -100, so only the
completion is learned), chat `messages` (runtime/chat.py: loss on assistant turns only), parquet/arrow
files and `datasets` directories with those columns (runtime/records.py), or plain text (documents
separated by blank lines). With `data.packing`
documents are concatenated (BOS ... EOS) and cut into `seq_len` blocks, each block with `position_ids`
that restart at 0 at every document start (and at the block start, where a cut document continues:
RoPE is relative, so its attention is unchanged) and the first token of every document unlabelled (-100),
so the last token of one document never predicts the next one's first. Attention stays inside each
document without a [s, s] mask (runtime/packed_attention.py reads the segments from the position ids;
an eager model gets transformers' packed-sequence mask from the same position ids). Otherwise each
document is one sample (long ones split into `seq_len` pieces) and a micro-batch is right-padded to its
longest sample (pads labelled -100).

Sampling is a pure function of (seed, step): optimizer step s consumes the global sample positions
[s·G, (s+1)·G) of an endless stream whose epoch e is `randperm(n, seed + e)`. Rank r, micro-step k,
item j reads position s·G + (k·W + r)·m + j. Resuming at step s therefore continues exactly where
the run stopped, and any world size / accumulation split covers the same G samples per step.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from shardtrain import demo_corpus
from shardtrain.runtime import chat, records

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_TOKENIZER = ASSETS / "tokenizer.json"
BUNDLED_CORPUS = demo_corpus.CORPUS
IGNORE = -100
log = logging.getLogger("shardtrain.data")


def train_source(train_path: str | None) -> str | Path:
    """data.train as read: `demo` is the bundled corpus. Unset also reads it (run dirs made by hand or
    by an emitted launch.sh; `shardtrain launch` refuses an unset data.train), but never silently."""
    if train_path is None:
        log.warning("data.train is not set: training on the bundled demo corpus (%s); %s", BUNDLED_CORPUS,
                    demo_corpus.NO_DATA_FIX)
        return BUNDLED_CORPUS
    return BUNDLED_CORPUS if demo_corpus.is_demo(train_path) else train_path


def load_tokenizer(tokenizer_dir: str | None, model_dir: str | None):
    """`model.tokenizer`, else the checkpoint directory's tokenizer, else the bundled BPE (vocab 512)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    for d in (tokenizer_dir, model_dir):
        if d and Path(d).is_dir() and any((Path(d) / f).is_file() for f in
                                          ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            tok = AutoTokenizer.from_pretrained(d)
            break
    else:
        if tokenizer_dir:
            raise FileNotFoundError(f"model.tokenizer: {tokenizer_dir!r} has no tokenizer files")
        tok = PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER), bos_token="<s>",
                                      eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def read_documents(path: str | Path, fmt: str = "auto") -> list[tuple]:
    """(text, None), (prompt, completion) or (messages, "chat") per document (formats: runtime/records.py)."""
    return records.read_documents(path, fmt)


def tokenize(tok, docs: list[tuple[str, str | None]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per document: BOS + text + EOS; prompt tokens masked with -100."""
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id]
    out = []
    for text, completion in docs:
        if completion == records.CHAT:  # rendered by the chat template (which writes its own BOS/EOS)
            out.append(chat.tokenize_chat(tok, text))
            continue
        first = tok(text, add_special_tokens=False)["input_ids"]
        if completion is None:
            ids = bos + first + eos
            labels = list(ids)
        else:
            comp = tok(completion, add_special_tokens=False)["input_ids"] + eos
            ids = bos + first + comp
            labels = [IGNORE] * (len(bos) + len(first)) + comp
        out.append((ids, labels))
    return out


def pack_documents(examples, seq_len: int) -> tuple[list[tuple[list[int], list[int]]], list[list[int]]]:
    """The documents concatenated and cut into seq_len blocks (the remainder dropped), each block's document
    starts (offsets in the block; 0 always), and the first token of every document unlabelled: a
    document's last token does not predict the next document's first."""
    ids: list[int] = []
    labels: list[int] = []
    doc_starts: list[int] = []
    for e_ids, e_labels in examples:
        if not e_ids:
            continue
        doc_starts.append(len(ids))
        ids += e_ids
        labels += [IGNORE] + list(e_labels[1:])
    samples: list[tuple[list[int], list[int]]] = []
    starts: list[list[int]] = []
    j = 0
    for i in range(len(ids) // seq_len):
        lo, hi = i * seq_len, (i + 1) * seq_len
        samples.append((ids[lo:hi], labels[lo:hi]))
        while j < len(doc_starts) and doc_starts[j] < lo:
            j += 1
        inside = []
        while j < len(doc_starts) and doc_starts[j] < hi:
            inside.append(doc_starts[j] - lo)
            j += 1
        starts.append(inside if inside[:1] == [0] else [0] + inside)
    return samples, starts


def position_ids(starts: list[int], length: int) -> list[int]:
    """Positions restarting at 0 at every start offset (starts[0] == 0)."""
    out: list[int] = []
    for a, b in zip(starts, starts[1:] + [length]):
        out += range(b - a)
    return out


def split_long(examples, seq_len: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for ids, labels in examples:
        for i in range(0, len(ids), seq_len):
            piece = (ids[i:i + seq_len], labels[i:i + seq_len])
            if len(piece[0]) >= 2 and any(x != IGNORE for x in piece[1][1:]):
                out.append(piece)
    return out


@dataclass
class TokenDataset:
    samples: list[tuple[list[int], list[int]]]
    pad_id: int
    doc_starts: list[list[int]] | None = None
    """Packed blocks: where each document starts in sample i (collate builds `position_ids` from them);
    None: no position ids (one sequence per row, transformers' default arange)."""

    def __len__(self) -> int:
        return len(self.samples)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Pad to the longest sample in this micro-batch (packed samples are all seq_len)."""
        rows = [self.samples[i] for i in indices]
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        batch = {"input_ids": ids, "labels": labels}
        if self.doc_starts is not None:
            batch["position_ids"] = torch.tensor([position_ids(self.doc_starts[i], width) for i in indices],
                                                 dtype=torch.long)
        if not bool(mask.all()):
            batch["attention_mask"] = mask
        return batch


def build_datasets(tok, *, train_path: str | None, eval_path: str | None, eval_fraction: float,
                   fmt: str, packing: bool, seq_len: int,
                   chat_template: str | None = None) -> tuple[TokenDataset, TokenDataset | None]:
    """Train and held-out datasets (eval: `data.eval`, else the last eval_fraction of documents)."""
    docs = read_documents(train_source(train_path), fmt)
    if any(d[1] == records.CHAT for d in docs):
        chat.apply_template(tok, chat_template)
    if eval_path:
        eval_docs = read_documents(BUNDLED_CORPUS if demo_corpus.is_demo(eval_path) else eval_path, fmt)
    elif eval_fraction > 0 and len(docs) > 1:
        k = max(1, int(len(docs) * eval_fraction))
        docs, eval_docs = docs[:-k], docs[-k:]
    else:
        eval_docs = []

    def make(ds) -> TokenDataset:
        ex = tokenize(tok, ds)
        if packing:
            samples, starts = pack_documents(ex, seq_len)
            return TokenDataset(samples, tok.pad_token_id, starts)
        return TokenDataset(split_long(ex, seq_len), tok.pad_token_id)

    train = make(docs)
    if len(train) == 0:
        raise ValueError(f"no training samples of seq_len {seq_len}: the data has fewer tokens than one "
                         "block; lower train.seq_len or add data")
    ev = make(eval_docs) if eval_docs else None
    return train, (ev if ev is not None and len(ev) else None)


class StepSampler:
    """Deterministic global-batch sampler (see module docstring)."""

    def __init__(self, n: int, seed: int, *, micro_batch: int, grad_accum: int, world_size: int, rank: int):
        self.n, self.seed = n, seed
        self.m, self.k, self.w, self.r = micro_batch, grad_accum, world_size, rank
        self.global_batch = micro_batch * grad_accum * world_size
        self.offset = 0
        """Stream positions before step 0's first sample (non-zero only after a resume whose checkpoint
        recorded another samples_seen than step x G: see :meth:`resume_at`)."""
        self._perms: dict[int, torch.Tensor] = {}

    def resume_at(self, step: int, samples_seen: int) -> None:
        """Continue the stream at GLOBAL sample position ``samples_seen`` (trainer_state.json) when the loop
        resumes at optimizer step ``step``: the position is stored in global samples, not per rank, so a
        resume on another world size / accumulation split reads the next samples of the same stream."""
        self.offset = int(samples_seen) - step * self.global_batch

    def _index(self, pos: int) -> int:
        epoch, i = divmod(pos, self.n)
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return int(self._perms[epoch][i])

    def micro_indices(self, step: int, micro: int, rank: int | None = None) -> list[int]:
        r = self.r if rank is None else rank
        start = self.offset + step * self.global_batch + (micro * self.w + r) * self.m
        return [self._index(start + j) for j in range(self.m)]

    def step_indices(self, step: int) -> list[list[int]]:
        """This rank's K micro-batches for optimizer step `step`."""
        return [self.micro_indices(step, k) for k in range(self.k)]

    def epoch_of(self, step: int) -> float:
        return (self.offset + step * self.global_batch) / self.n


def eval_indices(n: int, batches: int, micro_batch: int, world_size: int, rank: int) -> list[list[int]]:
    """Fixed held-out micro-batches for this rank (wrapping around small eval sets)."""
    total = min(batches * micro_batch * world_size, max(n, world_size * micro_batch))
    per_rank = math.ceil(total / (world_size * micro_batch))
    return [[((b * world_size + rank) * micro_batch + j) % n for j in range(micro_batch)]
            for b in range(per_rank)]


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss (labels are shifted by one inside the loss)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
