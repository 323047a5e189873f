"""Runs several worker scenarios in ONE torchrun launch (start-up costs 8–11 s per launch).

    torchrun --standalone --nproc_per_node 2 tests/runtime/driver.py SPEC.json

SPEC: {"out": "results.json", "scenarios": [{"name", "run_dir", "probe"?, "env"?}, ...]}.
Each scenario is a full `shardtrain.runtime.worker.run(run_dir)`; probes observe the engine
(collective counts, checkpointed layers, 4-bit layers). Rank 0 writes the results JSON after every
scenario; on an error the launch stops (a rank failing alone would hang the next collective).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist


def make_probe(name: str | None, box: dict):
    if not name:
        return None

    def probe(r):
        eng = r.engine
        if name in ("ddp_comm", "ddp_comm_no_nosync"):
            box["hook_calls"] = 0
            box["micro_of_call"] = []
            state = {"micro": 0}

            def pre(_m, _a, _k):
                state["micro"] += 1
            eng.module.register_forward_pre_hook(pre, with_kwargs=True)

            def hook(_state, bucket):
                box["hook_calls"] += 1
                box["micro_of_call"].append(state["micro"])
                fut = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future()
                return fut.then(lambda f: f.value()[0])
            eng.module.register_comm_hook(None, hook)
            if name == "ddp_comm_no_nosync":
                eng.micro_step = lambda is_last: contextlib.nullcontext()
        elif name == "fsdp_rs":
            box["reduce_scatters"] = 0
            orig = dist.reduce_scatter_single

            def counting(*a, **k):
                box["reduce_scatters"] += 1
                return orig(*a, **k)
            dist.reduce_scatter_single = counting
            box["_restore"] = lambda: setattr(dist, "reduce_scatter_single", orig)
            box["units"] = sum(1 for m in eng.model.modules() if hasattr(m, "_get_fsdp_state"))
        elif name == "ckpt_layers":
            from shardtrain.runtime.modeling import checkpointed_layers
            box["checkpointed"] = checkpointed_layers(eng.model)
        elif name == "qlora":
            import bitsandbytes as bnb
            q = [m for m in eng.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
            box["linear4bit"] = len(q)
            box["avx512bf16_flags"] = sorted({bool(m.support_avx512bf16_for_cpu) for m in q})
            box["quant_type"] = sorted({m.weight.quant_type for m in q})
            box["double_quant"] = sorted({bool(m.weight.compress_statistics) for m in q})
        elif name == "labels":  # issue 12: which tokens the loss sees (chat: assistant turns only)
            tok, samples = r.tokenizer, r.train_data.samples
            box["learned"] = [tok.decode([t for t in y if t != -100]) for _, y in samples[:8]]
            box["label_fraction"] = sum(t != -100 for _, y in samples for t in y) / sum(len(y) for _, y in samples)
        elif name == "frozen_bytes":  # issue 10: this rank's storage of the frozen (NF4) weights
            def local(p):
                t = getattr(p, "ds_tensor", None)
                t = t if t is not None else (p.to_local() if hasattr(p, "to_local") else p)
                return t.numel() * t.element_size()
            box["frozen_bytes"] = sum(local(p) for p in eng.model.parameters() if not p.requires_grad)
            box["quant_storage"] = sorted({str(m.weight.dtype) for m in eng.model.modules()
                                           if type(m).__name__ == "Linear4bit"})
        elif name == "samples":  # issue 21: the sample ids each rank trains on per step (a file per rank:
            # appended across a stop and resume, so a step read twice shows up twice)
            orig_indices = r.sampler.step_indices

            def recording(step):
                got = orig_indices(step)
                with open(r.run_dir / f"samples_rank{r.info.rank}.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "ids": [i for mb in got for i in mb]}) + "\n")
                return got
            r.sampler.step_indices = recording
        elif name == "compiled":  # issue 11: which modules train.compile compiled in place
            from shardtrain.runtime.compiling import is_compiled
            box["compiled"] = sorted({type(m).__name__ for m in eng.model.modules() if is_compiled(m)})
            box["compiled_count"] = sum(1 for m in eng.model.modules() if is_compiled(m))
        elif name == "mesh":  # issue 18: which mesh dims each parameter is split over (DTensor placements)
            from collections import Counter
            box["param_meshes"] = dict(Counter(",".join(getattr(p, "device_mesh", None) and p.device_mesh.mesh_dim_names
                                                        or ("none",)) for p in eng.model.parameters()))
            q = next(p for n, p in eng.model.named_parameters() if n.endswith("layers.0.self_attn.q_proj.weight")
                     or n.endswith("layers.0.self_attn.q_proj.base_layer.weight"))
            box["q_proj_local_shape"] = list(q.to_local().shape) if hasattr(q, "to_local") else list(q.shape)
        box["trainable"] = sum(p.numel() for p in eng.model.parameters() if p.requires_grad)
    return probe


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from shardtrain.runtime.dist import init_distributed
    from shardtrain.runtime.worker import run
    info = init_distributed("cpu")
    results = {}
    rc = 0
    for sc in spec["scenarios"]:
        box: dict = {}
        old_env = {k: os.environ.get(k) for k in sc.get("env", {})}
        os.environ.update({k: str(v) for k, v in sc.get("env", {}).items()})
        t0 = time.time()
        try:
            res = run(sc["run_dir"], destroy_group=False, on_setup=make_probe(sc.get("probe"), box))
            res["probe"] = {k: v for k, v in box.items() if not k.startswith("_")}
        except Exception as e:  # noqa: BLE001
            res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            rc = 1
        finally:
            if "_restore" in box:
                box["_restore"]()
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        res["wall_s"] = round(time.time() - t0, 2)
        results[sc["name"]] = res
        gc.collect()  # the finished scenario's engine sits in reference cycles: free it before the next one
        print(f"[driver rank{info.rank}] {sc['name']}: {'ERROR ' + res['error'] if 'error' in res else 'ok'} "
              f"({res['wall_s']} s)", file=sys.stderr, flush=True)
        if info.rank == 0:
            with open(spec["out"], "w") as f:
                json.dump(results, f, indent=1, default=str)
        if rc:
            print(res.get("traceback", ""), file=sys.stderr, flush=True)
            break
    dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
