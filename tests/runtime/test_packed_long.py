"""Issue 20 point 4: long sequences in the data path.

- packing with per-document position ids (runtime/data.py pack_documents): positions restart at 0 at every
  document and at a block start; the first token of each document is unlabelled (the previous document's
  last token predicts nothing across the boundary);
- runtime/packed_attention.py: a packed row's logits and every parameter gradient equal running each
  document ALONE through the same model (fp32, CPU), for b = 2 rows cut differently;
- no O(seq²) tensor: a tiny Llama at seq 16,384 (packed, unpacked, right-padded with a padding mask, and
  under FakeTensorMode as `plan --trace` runs it): forward + backward under a TorchDispatchMode that sees
  every op output; nothing with >= seq²/8 elements (a bit-packed [s, s] bitmap) is ever made;
- Ulysses cp 2 (real gloo ranks) with packed documents: the summed loss and the gradients equal the
  single-process per-document reference (the inner kernel gets the full sequence's positions);
- the loss is normalised by the global count of label tokens: 2 ranks with very uneven label counts
  (prompt/completion data, padded micro-batches, accumulation 2) reach the losses and parameters of the
  single-process reference (one torchrun launch through tests/runtime/driver.py).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from shardtrain.runtime.data import IGNORE, TokenDataset, count_label_tokens, pack_documents, position_ids
from shardtrain.runtime.packed_attention import (PACKED_ATTENTION, inner_kernel, install_packed,
                                                 segment_starts)

TINY = Path(__file__).resolve().parents[2] / "configs" / "models" / "tiny-llama.json"
ATOL = 2e-5


def _tiny(attn: str = "sdpa", **over):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(TINY)
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)


# ----------------------------------------------------------------------------------- data
def test_pack_documents_positions_and_labels():
    docs = [([1, 10, 11, 2], [1, 10, 11, 2]), ([1, 20, 2], [1, 20, 2]), ([1, 30, 31, 32, 33, 2], [1, 30, 31, 32, 33, 2]),
            ([1, 40, 2], [IGNORE, IGNORE, 2])]   # a prompt/completion document keeps its prompt unlabelled
    samples, starts = pack_documents(docs, 5)
    assert [s[0] for s in samples] == [[1, 10, 11, 2, 1], [20, 2, 1, 30, 31], [32, 33, 2, 1, 40]]
    assert starts == [[0, 4], [0, 2], [0, 3]]   # a block that starts inside a document restarts there too
    assert [s[1] for s in samples] == [[IGNORE, 10, 11, 2, IGNORE], [20, 2, IGNORE, 30, 31], [32, 33, 2, IGNORE, IGNORE]]
    assert position_ids([0, 4], 5) == [0, 1, 2, 3, 0]
    ds = TokenDataset(samples, pad_id=0, doc_starts=starts)
    b = ds.collate([1, 2])
    assert b["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 1]]
    assert "attention_mask" not in b
    assert count_label_tokens(b) == 3 + 2   # labels[1:] not ignored: no label across a document boundary
    assert segment_starts(b["position_ids"]) == [[0, 2], [0, 3]]


def test_ring_view_continues_positions_over_packed_documents():
    """Ring cp cannot keep documents apart: its view gives a packed row one run of positions (RoPE distances
    across documents stay true); labels still stop at each document boundary."""
    from shardtrain.runtime.ring_attention import ring_view
    ids = torch.arange(8).reshape(1, 8)
    labels = ids.clone()
    labels[0, 3] = IGNORE                      # document 2 starts at 3
    out, shift, _ = ring_view({"input_ids": ids, "position_ids": torch.tensor([position_ids([0, 3], 8)])}, labels, cp=2)
    assert out["position_ids"].tolist() == [list(range(8))]
    assert shift[0, 2].item() == IGNORE        # the last token of document 1 predicts nothing


def test_build_datasets_packs_with_positions(tmp_path):
    from shardtrain.runtime.data import build_datasets, load_tokenizer
    f = tmp_path / "t.txt"
    f.write_text("\n\n".join(f"Doc {i}: " + "word " * (3 + 5 * i) for i in range(10)))
    tok = load_tokenizer(None, None)
    train, _ = build_datasets(tok, train_path=str(f), eval_path=None, eval_fraction=0.0, fmt="text",
                              packing=True, seq_len=32)
    b = train.collate(list(range(len(train))))
    pos, ids, labels = b["position_ids"], b["input_ids"], b["labels"]
    bos = ids == tok.bos_token_id
    assert bool((pos[bos] == 0).all()) and bool((labels[bos] == IGNORE).all())   # every document restarts
    assert bool((pos[:, 0] == 0).all())


# ----------------------------------------------------------------------------------- exactness
def _docs_batch(seq: int, cuts: list[list[int]], vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(cuts), seq), generator=g)
    pos = torch.tensor([position_ids(c, seq) for c in cuts])
    return ids, pos


def test_packed_rows_equal_each_document_alone():
    ref, model = _tiny(), _tiny()
    assert install_packed(model) and inner_kernel(model) == "sdpa"
    assert model.config._attn_implementation == PACKED_ATTENTION
    cuts = [[0, 5, 17, 30], [0, 24]]
    ids, pos = _docs_batch(40, cuts, ref.config.vocab_size)
    w = torch.randn(2, 40, ref.config.vocab_size, generator=torch.Generator().manual_seed(2))
    out = model(input_ids=ids, position_ids=pos).logits
    (out * w).sum().backward()
    pieces = []
    for r, c in enumerate(cuts):
        row = []
        for a, b in zip(c, c[1:] + [40]):
            lg = ref(input_ids=ids[r:r + 1, a:b]).logits      # the document alone, positions 0..len-1
            (lg * w[r:r + 1, a:b]).sum().backward()
            row.append(lg)
        pieces.append(torch.cat(row, dim=1))
    assert (out - torch.cat(pieces)).abs().max().item() < ATOL
    worst = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    scale = max(q.grad.abs().max().item() for q in ref.parameters())
    assert worst < ATOL * scale, (worst, scale)   # fp32 sums in another order (cotangent: 80 x 512 randn)


def test_flash_inner_gets_one_row_with_its_positions(monkeypatch):
    """CUDA's flash path cannot run here: a stand-in flash_attention_2 derives its varlen boundaries with
    transformers' own prepare_fa_kwargs_from_position_ids (what the real flash path calls) and runs causal
    SDPA per boundary; packed_attention must hand it one row at a time (transformers reads packed
    position ids only at batch size 1) and the boundaries must be ours."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from shardtrain.runtime import packed_attention as pa
    calls = []

    def fake_flash(module, q, k, v, mask, position_ids=None, **kw):
        calls.append((q.shape[0], position_ids is not None and _is_packed_sequence(position_ids, q.shape[0])))
        (cu, _), _ = prepare_fa_kwargs_from_position_ids(position_ids) if position_ids is not None and \
            _is_packed_sequence(position_ids, q.shape[0]) else ((torch.tensor([0, q.shape[2]]), None), None)
        return pa.packed_sdpa(module, q, k, v, [cu[:-1].tolist()] * q.shape[0], kw), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._local_mapping, "flash_attention_2", fake_flash)
    model, ref = _tiny(), _tiny()
    pa._INNER.clear()
    assert install_packed(ref)
    for m in [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]:
        pa._INNER[m] = "flash_attention_2"
    model.config._attn_implementation = PACKED_ATTENTION
    cuts = [[0, 9, 30], [0, 4]]    # row 1 starts inside a document: positions restart at 0 there too
    ids, pos = _docs_batch(40, cuts, model.config.vocab_size)
    out = model(input_ids=ids, position_ids=pos).logits
    assert (out - ref(input_ids=ids, position_ids=pos).logits).abs().max().item() < ATOL
    assert calls and all(b == 1 and packed for b, packed in calls), calls
    calls.clear()
    model(input_ids=ids).logits   # nothing packed: one batched call
    assert calls and all(b == 2 for b, _ in calls), calls


def test_install_leaves_eager_alone():
    model = _tiny("eager")       # eager makes [s, s] scores anyway; it keeps transformers' packed mask
    assert not install_packed(model) and model.config._attn_implementation == "eager"


# ----------------------------------------------------------------------------------- no seq² tensor
class _Largest(TorchDispatchMode):
    """Every op output's element count (the largest seen, and the ops at or over a limit)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.largest, self.over = limit, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() >= self.limit:
                    self.over.append(f"{func}: {tuple(t.shape)} {t.dtype}")
        return out


SEQ = 16_384


@pytest.mark.parametrize("feed,seq", [("packed", SEQ), ("fake", SEQ), ("unpacked", 4096), ("padded", 4096)])
def test_no_quadratic_tensor_at_long_sequence(feed, seq):
    """packed: 16,384 tokens of documents up to 1,024 long (cost ~ the sum of squared document lengths);
    fake: 16,384 unpacked under FakeTensorMode (plan --trace; no compute); unpacked and right-padded
    rows run one causal kernel over the whole row, so 4,096 keeps them to seconds on 2 cores."""
    import contextlib
    from torch._subclasses.fake_tensor import FakeTensorMode
    model = _tiny(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                  num_hidden_layers=1, max_position_embeddings=seq, vocab_size=256)
    install_packed(model)
    kw = {"input_ids": torch.randint(3, 256, (1, seq))}
    if feed == "packed":
        kw["position_ids"] = torch.tensor([position_ids(list(range(0, seq, 1024)) + [seq - 100], seq)])
    if feed == "padded":   # a right-padded row: the padding mask is dropped, no [s, s] mask is made
        kw["attention_mask"] = torch.ones(1, seq, dtype=torch.long)
        kw["attention_mask"][0, -100:] = 0
    log = _Largest(seq * seq // 8)
    with (FakeTensorMode(allow_non_fake_inputs=True) if feed == "fake" else contextlib.nullcontext()):
        with log:
            model(**kw).logits.float().sum().backward()
    assert not log.over, log.over
    assert log.largest <= seq * 256   # the logits (s x V) are the largest tensor


def test_without_packed_attention_transformers_builds_the_mask():
    """The detector sees the [s, s] mask transformers makes for packed position ids when the model is not
    routed through packed_attention (so the test above can fail)."""
    s = 2048
    model = _tiny(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                  num_hidden_layers=1, vocab_size=256)
    log = _Largest(s * s // 8)
    with log:
        model(input_ids=torch.randint(3, 256, (1, s)), position_ids=torch.tensor([position_ids([0, 700], s)])).logits.sum()
    assert log.over


# ----------------------------------------------------------------------------------- Ulysses cp 2
CP = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ulysses_case(rank: int) -> dict:
    from shardtrain.runtime.context_parallel import cp_slice, cp_token_count, install_ulysses, shifted_ce_sum
    from shardtrain.runtime.loss import ce_sum
    ref, model = _tiny(), _tiny()
    install_packed(model)
    install_ulysses(model, dist.group.WORLD)
    seq, cuts = 32, [[0, 7, 19], [0, 16, 21]]     # a document crosses the cp slice boundary in both rows
    ids, pos = _docs_batch(seq, cuts, ref.config.vocab_size)
    labels = ids.clone()
    for r, c in enumerate(cuts):
        labels[r, c] = IGNORE                     # pack_documents: documents' first tokens unlabelled
    # reference: each document alone, summed token losses, one normaliser
    total_ref, n_ref = 0.0, int((labels[:, 1:] != IGNORE).sum())
    for r, c in enumerate(cuts):
        for a, b in zip(c, c[1:] + [seq]):
            total_ref = total_ref + ce_sum(ref(input_ids=ids[r:r + 1, a:b]).logits, labels[r:r + 1, a:b])
    (total_ref / n_ref).backward()
    sl = cp_slice(ids, labels, rank, CP, position_ids=pos)
    n = cp_token_count(sl["shift_labels"], dist.group.WORLD)
    loss = shifted_ce_sum(model(input_ids=sl["input_ids"], position_ids=sl["position_ids"]).logits, sl["shift_labels"])
    (loss / n).backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    worst = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        worst = max(worst, (g - q.grad).abs().max().item())
    return {"n": n, "n_ref": n_ref, "loss_diff": abs(total.item() - float(total_ref.detach())), "grad_diff": worst,
            "loss": float(total_ref.detach())}


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=CP)
    try:
        res = _ulysses_case(rank)
        if rank == 0:
            Path(out).write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_ulysses_packed_documents_match_single_process(tmp_path):
    out = tmp_path / "res.json"
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=CP, start_method="spawn", join=True)
    m = json.loads(out.read_text())
    print("\nUlysses cp 2 + packed documents vs each document alone:", m)
    assert m["n"] == m["n_ref"]
    assert m["loss_diff"] < ATOL * max(1.0, m["loss"]), m
    assert m["grad_diff"] < ATOL, m


# ----------------------------------------------------------------------------------- loss normaliser
def _uneven_data(tmp: Path) -> Path:
    data = tmp / "uneven.jsonl"
    rows = [{"prompt": "question " + "word " * (1 + (7 * i) % 40), "completion": " answer" * (1 + i % 3)}
            for i in range(64)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return data


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory):
    """One 2-rank launch: DDP on prompt/completion data with very uneven label counts (padded micro-batches,
    accumulation 2), and DDP on packed documents (position ids in every batch, packed_attention)."""
    from conftest import run_driver
    base = tmp_path_factory.mktemp("packed_long")
    train = {"strategy": "ddp", "precision": "fp32", "steps": 3, "micro_batch": 2, "global_batch": 8}
    sc = [{"name": "uneven_ddp", "over": {"data": {"train": str(_uneven_data(base)), "packing": False,
                                                    "eval_fraction": 0.0}, "train": train}},
          {"name": "packed_ddp", "over": {"train": train}}]
    return run_driver(base, sc)


def _check_against_reference(run_dir: Path) -> None:
    from reference import reference_run
    from safetensors.torch import load_file
    ref_losses, ref_sd = reference_run(run_dir)   # single process; transformers' own masks for packed rows
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in recs if r["kind"] == "train"] == pytest.approx(ref_losses, rel=1e-5)
    sd = load_file(str(run_dir / "final" / "model.safetensors"))
    worst = max((sd[k].float() - ref_sd[k].float()).abs().max().item() for k in sd)
    assert worst < 2e-5, worst


@pytest.mark.multiproc
def test_uneven_label_counts_across_ranks_match_reference(worker_runs):
    """The worker's loss is the sum of token losses over ranks and micro-steps / the global label count (not
    a mean of per-rank means): with these counts both the logged losses and the parameters equal the
    single-process reference only then."""
    from shardtrain.runtime.build import read_run_dir
    from shardtrain.runtime.data import StepSampler, build_datasets, load_tokenizer
    run_dir = Path(worker_runs["uneven_ddp"]["run_dir"])
    cfg, plan = read_run_dir(run_dir)
    train, _ = build_datasets(load_tokenizer(None, None), train_path=plan.runtime.data_train, eval_path=None,
                              eval_fraction=0.0, fmt="auto", packing=False, seq_len=plan.train.seq_len)
    c = plan.chosen
    counts = [[count_label_tokens(train.collate(ix)) for ix in
               StepSampler(len(train), cfg.train.seed, micro_batch=c.micro_batch_size, grad_accum=c.grad_accum_steps,
                           world_size=2, rank=r).step_indices(0)] for r in range(2)]
    flat = [n for per_rank in counts for n in per_rank]
    assert c.grad_accum_steps == 2 and max(flat) >= 2 * min(flat), counts   # really uneven
    _check_against_reference(run_dir)


@pytest.mark.multiproc
def test_packed_documents_in_the_worker_match_reference(worker_runs):
    _check_against_reference(Path(worker_runs["packed_ddp"]["run_dir"]))
