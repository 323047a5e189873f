"""Throughput and peak memory of the memory savers (issue 10), measured in ONE run, back to back:

    python benchmarks/memory_savers.py                  # CPU or the first CUDA GPU, 32k vocabulary
    python benchmarks/memory_savers.py --record         # also write benchmarks/results/memory_savers.*

Modes (the runtime's own loss module, shardtrain/runtime/loss.py TokenLoss, on a random-init Llama
with a 32k vocabulary): loss full vs chunked, activation offload none vs cpu (with and without
full gradient checkpointing). Each round runs every mode for --steps forward+backward steps in turn
(alternating, so background load hits all modes alike); tokens/s = tokens / median step time.
Ratios printed: chunked / full and offload / none (>1 = faster). Peak bytes of one step: CUDA
max_memory_allocated on a GPU, PyTorch's MemTracker (real mode, live tensors) on CPU; the predicted
drop of the chunked loss is compiler/activations.py logits_bytes(full) - logits_bytes(chunked).
On CPU the offload "host" is the same memory: the ratio only shows the copy cost of the hooks.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODES = (("full", "none", False), ("chunked", "none", False), ("full", "cpu", False),
         ("full", "none", True), ("full", "cpu", True), ("chunked", "cpu", True))


def build(args, device, ckpt: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=args.vocab, use_cache=False)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(device)
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.train()
    return m, cfg


def loss_fn(m, device, loss: str, offload: str, chunk: int):
    from shardtrain.compiler.specs import ActivationOffload, LossMode, Precision
    from shardtrain.runtime.engines import BaseEngine
    from shardtrain.runtime.loss import TokenLoss
    eng = BaseEngine(m, None, precision=Precision.FP32, grad_clip=0, device=device)
    return TokenLoss(eng, LossMode(loss), chunk, ActivationOffload(offload))


def peak_bytes(m, fn, ids, device) -> int:
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn({"input_ids": ids}, ids).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.distributed._tools.mem_tracker import MemTracker
    mt = MemTracker()
    mt.track_external(m)
    with mt:
        fn({"input_ids": ids}, ids).backward()
    return max(d["Total"] for d in mt.get_tracker_snapshot("peak").values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--chunk-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--record", action="store_true", help="write benchmarks/results/memory_savers.{json,md}")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    load_before = os.getloadavg()
    t_start = time.time()
    models = {ck: build(args, device, ck) for ck in (False, True)}
    cfg = models[False][1]
    ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    fns = {mode: loss_fn(models[mode[2]][0], device, mode[0], mode[1], args.chunk_tokens) for mode in MODES}
    times = {mode: [] for mode in MODES}
    losses = {}
    for _ in range(args.rounds):
        for mode in MODES:
            m = models[mode[2]][0]
            for _s in range(args.steps):
                m.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = fns[mode]({"input_ids": ids}, ids)
                loss.backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - t0)
                losses[mode] = float(loss.detach())
    tokens = args.micro_batch * args.seq_len
    tps = {mode: tokens / statistics.median(ts[1:] or ts) for mode, ts in times.items()}
    name = {mode: f"loss={mode[0]} offload={mode[1]} ckpt={'full' if mode[2] else 'none'}" for mode in MODES}
    ratios = {
        "chunked_vs_full": tps[("chunked", "none", False)] / tps[("full", "none", False)],
        "offload_vs_none": tps[("full", "cpu", False)] / tps[("full", "none", False)],
        "offload_vs_none_ckpt_full": tps[("full", "cpu", True)] / tps[("full", "none", True)],
    }
    from shardtrain.compiler.activations import logits_bytes
    from shardtrain.compiler.model_hf import model_spec_from_hf_config
    from shardtrain.compiler.specs import LossMode, Precision
    spec = model_spec_from_hf_config(cfg.to_dict())
    kw = dict(micro_batch=args.micro_batch, seq_len=args.seq_len, precision=Precision.FP32,
              chunk_tokens=args.chunk_tokens)
    predicted_drop = logits_bytes(spec, loss=LossMode.FULL, **kw) - logits_bytes(spec, loss=LossMode.CHUNKED, **kw)
    peaks = {l: peak_bytes(models[False][0], fns[(l, "none", False)], ids, device) for l in ("full", "chunked")}
    measured_drop = peaks["full"] - peaks["chunked"]
    print(f"device {device}, vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, "
          f"micro {args.micro_batch} x seq {args.seq_len}, chunk {args.chunk_tokens} tokens, fp32")
    for mode in MODES:
        print(f"  {name[mode]:<40} {tps[mode]:>10.0f} tokens/s   loss {losses[mode]:.4f}")
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.3f}")
    print(f"peak one step: full {peaks['full'] / 2**20:.1f} MiB, chunked {peaks['chunked'] / 2**20:.1f} MiB; "
          f"drop {measured_drop / 2**20:.1f} MiB measured vs {predicted_drop / 2**20:.1f} MiB predicted "
          f"({measured_drop / predicted_drop:.3f})")
    if args.record:
        import transformers
        cmd = "python benchmarks/memory_savers.py " + " ".join(argv if argv is not None else sys.argv[1:])
        rec = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": cmd.strip(),
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "cpu_cores": os.cpu_count(),
                            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"},
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()],
               "wall_s": round(time.time() - t_start, 1), "args": vars(args),
               "tokens_per_s": {name[m]: round(v, 1) for m, v in tps.items()},
               "ratios": {k: round(v, 4) for k, v in ratios.items()},
               "peak_bytes": peaks, "measured_drop_bytes": measured_drop, "predicted_drop_bytes": predicted_drop}
        out = ROOT / "benchmarks" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory_savers.json").write_text(json.dumps(rec, indent=2) + "\n")
        with (out / "memory_savers.history.jsonl").open("a") as f:   # every recorded run: the noise
            f.write(json.dumps({k: rec[k] for k in ("date", "command", "load_average_before", "ratios",
                                                     "measured_drop_bytes", "predicted_drop_bytes")}) + "\n")
        lines = [f"# Memory savers: chunked loss and activation offload (issue 10)", "",
                 f"Measured {rec['date']} with `{rec['command']}` ({rec['wall_s']} s) on {rec['versions']['device']} "
                 f"({os.cpu_count()} cores; load average before/after {rec['load_average_before']} / "
                 f"{rec['load_average_after']}: other jobs shared the cores, ratios are back to back).", "",
                 f"Versions: python {rec['versions']['python']}, torch {rec['versions']['torch']}, "
                 f"transformers {rec['versions']['transformers']}.", "",
                 "| mode | tokens/s |", "|---|---:|"]
        lines += [f"| {name[m]} | {tps[m]:.0f} |" for m in MODES]
        lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in ratios.items()]
        lines += ["", f"Peak of one forward+backward ({'CUDA max_memory_allocated' if device.type == 'cuda' else 'MemTracker, live tensors'}): "
                  f"full {peaks['full'] / 2**20:.1f} MiB, chunked {peaks['chunked'] / 2**20:.1f} MiB; drop "
                  f"{measured_drop / 2**20:.1f} MiB measured vs {predicted_drop / 2**20:.1f} MiB predicted by the plan's "
                  f"logits term ({measured_drop / predicted_drop:.3f}).", "",
                 "On CPU the activation offload copies saved tensors into (unpinned) host memory that is the same "
                 "RAM: the ratio is the cost of the hooks' copies, not of PCIe; the GPU harness measures the real one."]
        (out / "memory_savers.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
