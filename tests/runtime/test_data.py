"""Data: formats, prompt masking, packing / dynamic padding, deterministic distributed sampling,
the bundled tokenizer and corpus."""
from __future__ import annotations

import json

import pytest
import torch

from shardtrain.runtime.data import (BUNDLED_CORPUS, BUNDLED_TOKENIZER, IGNORE, StepSampler, build_datasets,
                                     count_label_tokens, eval_indices, load_tokenizer, read_documents, tokenize)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None, None)


def test_bundled_assets(tok):
    assert BUNDLED_TOKENIZER.is_file() and 100_000 <= BUNDLED_CORPUS.stat().st_size <= 300_000
    assert len(tok) <= 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)
    text = "Ada went to the garden with a red fox."
    assert tok.decode(tok(text)["input_ids"]) == text


def test_bundled_assets_are_reproducible(tmp_path):
    from shardtrain.runtime.assets import make_assets
    assert make_assets.make_corpus() == BUNDLED_CORPUS.read_text()


def test_prompt_completion_masks_prompt(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "Q: two plus two?", "completion": " A: four."}) + "\n"
                 + json.dumps({"text": "Counting: one two three."}) + "\n")
    docs = read_documents(f)
    assert docs[0] == ("Q: two plus two?", " A: four.") and docs[1][1] is None
    (ids, labels), (ids2, labels2) = tokenize(tok, docs)
    n_prompt = 1 + len(tok("Q: two plus two?", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert labels2 == ids2


def test_bad_jsonl_record(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="prompt"):
        read_documents(f)


def test_packing_and_padding(tok, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"Doc {i}: " + "word " * (3 + 7 * i) for i in range(12)))
    packed, _ = build_datasets(tok, train_path=str(f), eval_path=None, eval_fraction=0.0, fmt="auto",
                               packing=True, seq_len=16)
    assert all(len(s[0]) == 16 for s in packed.samples)
    b = packed.collate([0, 1])
    assert b["input_ids"].shape == (2, 16) and "attention_mask" not in b
    padded, _ = build_datasets(tok, train_path=str(f), eval_path=None, eval_fraction=0.0, fmt="text",
                               packing=False, seq_len=64)
    lens = [len(s[0]) for s in padded.samples]
    assert len(set(lens)) > 1 and max(lens) <= 64
    short, long_ = lens.index(min(lens)), lens.index(max(lens))
    b = padded.collate([short, long_])
    assert b["input_ids"].shape == (2, max(lens))        # padded to the longest in the batch
    assert int(b["attention_mask"][0].sum()) == min(lens)
    assert (b["labels"][0, min(lens):] == IGNORE).all()
    assert (b["input_ids"][0, min(lens):] == tok.pad_token_id).all()
    assert count_label_tokens(b) == (min(lens) - 1) + (max(lens) - 1)


def test_eval_split_from_train(tok):
    train, ev = build_datasets(tok, train_path=None, eval_path=None, eval_fraction=0.05, fmt="auto",
                               packing=True, seq_len=64)
    assert len(train) > 500 and ev is not None and 0 < len(ev) < len(train) / 10
    assert set(map(tuple, (s[0] for s in ev.samples))).isdisjoint(set(map(tuple, (s[0] for s in train.samples[:2000]))))


def test_sampler_covers_global_batch_once_per_step():
    n, seed = 50, 3
    ranks = [StepSampler(n, seed, micro_batch=2, grad_accum=3, world_size=2, rank=r) for r in range(2)]
    single = StepSampler(n, seed, micro_batch=2, grad_accum=6, world_size=1, rank=0)
    seen = []
    for step in range(20):
        got = sorted(i for s in ranks for mb in s.step_indices(step) for i in mb)
        assert got == sorted(i for mb in single.step_indices(step) for i in mb)   # any split, same samples
        seen += [i for mb in single.step_indices(step) for i in mb]   # in position order
    # 20 steps × 12 = 240 positions = 4.8 epochs: every epoch is a permutation (no repeats within it)
    for e in range(4):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))
    # deterministic: a fresh sampler (a resumed run) yields the same batches for the same step
    again = StepSampler(n, seed, micro_batch=2, grad_accum=3, world_size=2, rank=1)
    assert again.step_indices(13) == ranks[1].step_indices(13)
    assert StepSampler(n, seed + 1, micro_batch=2, grad_accum=3, world_size=2, rank=1).step_indices(0) \
        != ranks[1].step_indices(0)


def test_eval_indices_same_count_on_every_rank():
    a = [eval_indices(5, 4, 2, 2, r) for r in range(2)]
    assert len(a[0]) == len(a[1]) >= 1
    assert all(0 <= i < 5 for r in a for mb in r for i in mb)


def test_tokenizer_from_checkpoint_dir(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    t2 = load_tokenizer(None, str(tmp_path))
    assert t2("a red fox")["input_ids"] == tok("a red fox")["input_ids"]
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"), None)
