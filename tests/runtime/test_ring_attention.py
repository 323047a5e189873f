"""Issue 18 point 7 (ring part): ring context parallel (runtime/ring_attention.py), what runs on CPU.

torch's ring SDPA has CUDA kernels only, so nothing here runs the ring attention kernel itself (never
run on CUDA by these tests). What is tested, on real gloo process groups of 2 where it takes ranks:
- ring_view: labels shifted over the FULL sequence, global positions, right padding to 2·cp, the
  padding mask dropped, fresh tensors; check_ring_len's one-line refusal;
- ring_shard (torch's real context_parallel, no SDPA call inside): the buffers are sharded in place,
  head-tail load balanced (rank r: chunks r and 2·cp-1-r), each rank's labels still match its tokens'
  positions, context_parallel_unshard gives the originals back, and they stay sharded after the context;
- a tiny Llama under ring_shard with an attention that does on CPU what the ring computes (this rank's
  queries against every rank's keys, causal by GLOBAL position): the summed loss over the cp group, the
  token count and every parameter gradient (summed over cp) equal the single-process full-sequence
  model. This checks the buffer preparation, shift and token count under torch's reordering;
- ring_attention (the AttentionInterface function, outside the context = plain causal SDPA) gives the
  model's own sdpa logits (GQA repeat, scaling); install_ring refuses eager / flash / sliding window in
  one line; ring off CUDA is refused in one line by build (_install_cp) and by the preflight, which lets
  it through on a GPU machine.
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

from shardtrain.runtime.context_parallel import IGNORE_INDEX, cp_token_count, shifted_ce_sum
from shardtrain.runtime.ring_attention import (RING_ATTENTION, RingCP, check_ring_len, install_ring, ring_shard,
                                               ring_view)

TINY = Path(__file__).resolve().parents[2] / "configs" / "models" / "tiny-llama.json"
CP = 2
MODEL_ATOL = 1e-5
EMULATED = "shardtrain_test_ring_emulation"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(b=2, s=11, vocab=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX      # a prompt that is not learned
    labels[1, s - 3:] = IGNORE_INDEX  # right padding
    mask = torch.ones_like(ids)
    mask[1, s - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}, labels


# ------------------------------------------------------------------------------------- single process
def test_ring_view_shifts_over_full_sequence_and_pads_to_2cp():
    batch, labels = _batch(s=11)
    out, shift, shifted = ring_view(dict(batch), labels, cp=2)
    assert shifted and set(out) == {"input_ids", "position_ids"}  # the padding mask is dropped
    assert out["input_ids"].shape == (2, 12) and shift.shape == (2, 12)  # 11 -> 12, a multiple of 2·cp
    assert torch.equal(out["input_ids"][:, :11], batch["input_ids"])
    want = torch.full((2, 12), IGNORE_INDEX)
    want[:, :10] = labels[:, 1:]                                  # position t predicts token t+1
    assert torch.equal(shift, want)
    assert out["position_ids"].tolist() == [list(range(12))] * 2  # global, continued over the padding
    assert out["input_ids"].data_ptr() != batch["input_ids"].data_ptr()  # fresh: context_parallel resizes it
    # given positions (a later window of a document) stay global; a divisible length is not padded
    batch, labels = _batch(s=8)
    pos = torch.arange(40, 48).expand(2, 8)
    out, shift, _ = ring_view({**batch, "position_ids": pos}, labels, cp=2)
    assert out["position_ids"].tolist() == [list(range(40, 48))] * 2 and shift.shape == (2, 8)


def test_check_ring_len_one_line():
    check_ring_len(16, 4)
    with pytest.raises(ValueError, match=r"sequence length 12 is not divisible by 2·cp = 8") as e:
        check_ring_len(12, 4)
    assert "\n" not in str(e.value) and "parallel.cp" in str(e.value)


def _tiny(attn="sdpa", **over):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(TINY, **over)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)


def test_ring_attention_outside_context_is_the_models_sdpa():
    """No context: ring_attention is plain causal SDPA, so logits equal the model's own sdpa (GQA 4/2)."""
    ref, model = _tiny(), _tiny()
    model.load_state_dict(ref.state_dict())
    install_ring(model)
    assert model.config._attn_implementation == RING_ATTENTION
    ids = _batch(s=12)[0]["input_ids"]
    with torch.no_grad():
        diff = (model(input_ids=ids).logits - ref(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5, diff


@pytest.mark.parametrize("attn,over,match", [
    ("eager", {}, "attention implementation 'eager' cannot run under ring cp"),
    ("sdpa", {"sliding_window": 4, "model_type": "mistral"}, "sliding-window attention"),
])
def test_install_ring_refuses_in_one_line(attn, over, match):
    if over.get("model_type") == "mistral":
        from transformers import MistralConfig, MistralForCausalLM
        cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=1, vocab_size=128, sliding_window=4)
        model = MistralForCausalLM._from_config(cfg, attn_implementation=attn)
    else:
        model = _tiny(attn)
    with pytest.raises(ValueError, match=match) as e:
        install_ring(model)
    assert "\n" not in str(e.value)


def test_flash_attention_is_refused_in_one_line():
    model = _tiny()
    model.config._attn_implementation = "flash_attention_2"  # cannot load here (no CUDA); the check reads the name
    with pytest.raises(ValueError, match="'flash_attention_2' cannot run under ring cp.*train.attention: sdpa") as e:
        install_ring(model)
    assert "\n" not in str(e.value)


def test_build_refuses_ring_off_cuda_in_one_line():
    from shardtrain.compiler.specs import ParallelDims
    from shardtrain.runtime.build import _install_cp
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=2, tp=1, cp_mode="ring")
    with pytest.raises(ValueError, match="ring cannot run on cpu.*parallel.cp_mode: ulysses") as e:
        _install_cp(_tiny(), dims, None, "cpu")
    assert "\n" not in str(e.value)


def test_preflight_ring_cpu_refused_gpu_allowed(tmp_path):
    import dataclasses
    from shardtrain.compiler.specs import ParallelDims
    from shardtrain.config.pipeline import compile as compile_config
    from shardtrain.launcher import preflight
    from shardtrain.launcher.preflight import Machine
    GiB = 2**30
    cfg, plan = compile_config(Path(__file__).resolve().parents[2] / "configs/examples/tiny-cpu.yaml", {})
    plan = dataclasses.replace(plan, chosen=dataclasses.replace(
        plan.chosen, parallel=ParallelDims(dp_replicate=1, dp_shard=1, cp=2, tp=1, cp_mode="ring")))
    cpu = preflight.check(cfg, plan, machine=Machine(gpus=0, host_memory_bytes=24 * GiB, cpus=2), device="cpu",
                          nproc=2, run_dir=tmp_path / "run")
    ring = [p for p in cpu.problems if "cp_mode" in p]
    assert len(ring) == 1 and "cannot run on CPU" in ring[0] and "\n" not in ring[0]
    gpu = preflight.check(cfg, plan, machine=Machine(gpus=2, gpu_memory_bytes=(80 * GiB,) * 2,
                                                     host_memory_bytes=512 * GiB, cpus=32),
                          device="cuda", nproc=2, run_dir=tmp_path / "run")
    assert not any("cp_mode" in p or "ring" in p for p in gpu.problems), gpu.problems


# ------------------------------------------------------------------------------------- 2 gloo ranks
def _emulated_ring(module, query, key, value, attention_mask, position_ids=None, scaling=None, **kwargs):
    """What the ring computes, on CPU: this rank's queries against every cp rank's keys/values, causal by
    GLOBAL position (the load balancer reorders tokens, so positions, not indices, decide the mask)."""
    import torch.distributed.nn.functional as dnn
    assert position_ids is not None, "the model passes position_ids to its attention"
    ks = torch.cat(dnn.all_gather(key.contiguous()), dim=2)
    vs = torch.cat(dnn.all_gather(value.contiguous()), dim=2)
    pos = [torch.empty_like(position_ids) for _ in range(dist.get_world_size())]
    dist.all_gather(pos, position_ids.contiguous())
    pk = torch.cat(pos, dim=-1)                                                 # [b, s]
    groups = query.shape[1] // ks.shape[1]
    ks, vs = ks.repeat_interleave(groups, dim=1), vs.repeat_interleave(groups, dim=1)
    scores = query @ ks.transpose(-1, -2) * scaling
    allowed = pk[:, None, None, :] <= position_ids[:, None, :, None]
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs
    return out.transpose(1, 2).contiguous(), None


def _shard_case(rank, mesh):
    batch, labels = _batch(s=11)
    b, shift, _ = RingCP(mesh).view(dict(batch), labels)
    orig = {"input_ids": b["input_ids"].clone(), "position_ids": b["position_ids"].clone(), "shift": shift.clone()}
    from torch.distributed.tensor.experimental._attention import context_parallel_unshard
    with ring_shard(mesh, b, shift):
        local_pos = b["position_ids"][0].tolist()
        aligned = (torch.equal(shift, orig["shift"].gather(1, b["position_ids"]))
                   and torch.equal(b["input_ids"], orig["input_ids"].gather(1, b["position_ids"])))
        back = context_parallel_unshard(mesh, [b["input_ids"], b["position_ids"], shift], [1, 1, 1])
    chunk = 12 // (2 * CP)
    want = list(range(rank * chunk, (rank + 1) * chunk)) + list(range((2 * CP - 1 - rank) * chunk,
                                                                     (2 * CP - rank) * chunk))
    return {"positions_ok": local_pos == want, "aligned": aligned,
            "roundtrip": all(torch.equal(x, y) for x, y in zip(back, orig.values())),
            "stays_sharded": tuple(shift.shape) == (2, 12 // CP)}


def _model_case(rank, mesh):
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    from shardtrain.runtime.ring_attention import _no_mask
    ref, model = _tiny(), _tiny()
    model.load_state_dict(ref.state_dict())
    batch, labels = _batch(s=14)                # padded to 16 by ring_view
    ids = batch["input_ids"]
    full_shift = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    full = shifted_ce_sum(ref(input_ids=ids).logits, full_shift)
    n_full = int((full_shift != IGNORE_INDEX).sum())
    (full / n_full).backward()
    install_ring(model)                         # the real checks and registration...
    AttentionInterface.register(EMULATED, _emulated_ring)  # ...then the CPU stand-in for torch's ring SDPA
    AttentionMaskInterface.register(EMULATED, _no_mask)
    model.config._attn_implementation = EMULATED
    b, shift, shifted = ring_view(dict(batch), labels, CP)
    with ring_shard(mesh, b, shift):
        n = cp_token_count(shift, mesh.get_group())
        loss = shifted_ce_sum(model(**b).logits, shift)
        (loss / n).backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    worst = 0.0
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)  # what averaging over cp does, up to the 1/cp the loop's scale undoes
        worst = max(worst, (g - q.grad).abs().max().item())
    return {"n": n, "n_full": n_full, "loss_diff": abs(total.item() - full.item()), "grad_diff": worst,
            "loss": full.item()}


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=CP)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (CP,), mesh_dim_names=("cp",))
        res = {"shard": _shard_case(rank, mesh), "model": _model_case(rank, mesh)}
        all_res = [None] * CP
        dist.all_gather_object(all_res, res)
        if rank == 0:
            Path(out).write_text(json.dumps(all_res))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("ring") / "res.json"
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=CP, start_method="spawn", join=True)
    res = json.loads(out.read_text())
    print("\nring cp on 2 gloo ranks:", json.dumps(res))
    return res


@pytest.mark.multiproc
def test_context_parallel_shards_load_balanced_and_unshards_back(two_rank):
    for rank, r in enumerate(two_rank):
        assert r["shard"] == {"positions_ok": True, "aligned": True, "roundtrip": True, "stays_sharded": True}, \
            (rank, r["shard"])


@pytest.mark.multiproc
def test_tiny_llama_loss_and_grads_under_ring_shards_match_full_sequence(two_rank):
    for r in two_rank:
        m = r["model"]
        assert m["n"] == m["n_full"], "the cp group counts every labelled token once"
        assert m["loss_diff"] < MODEL_ATOL * max(1.0, m["loss"]), m
        assert m["grad_diff"] < MODEL_ATOL, m
