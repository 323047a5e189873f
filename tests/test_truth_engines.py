"""Truth test of the memory model (issue 2): the model-state terms the compiler predicts per rank
(params, grads, master params, optimizer states — and what ZeRO-Offload keeps on the host) equal the
bytes counted in the real engines within 2%, for a tiny Llama on 2 gloo ranks.

One torchrun launch of tests/truth/engine_bytes.py runs every scenario (start-up dominates on 2
cores); the script builds the model from configs/models/tiny-llama.json with transformers, wraps it
with torch DDP / FSDP2 / DeepSpeed ZeRO-1/2/3 (+ CPU offload with DeepSpeedCPUAdam), runs two real
steps and counts distinct tensor storages per term at several points of the second step (each
term's maximum over them is compared: a plan needs the peak). The prediction is
`model_state_bytes(...)` for the same strategy on HardwareSpec(nodes=1, gpus_per_node=2).

CPU vs GPU: on this machine DeepSpeed's accelerator *and* its offload device are both host memory,
so "device" and "host" cannot be told apart by address; engine_bytes.py assigns them from the
engine's own placement (what stage_1_and_2.py / stage3.py allocate on `self.device` = 'cpu' when
offloading), which is the GPU layout. Everything else DeepSpeed allocates the same way on CPU and
GPU (same dtypes: the CPU accelerator supports bf16, so no fp32 fallback happens; `torch_adam`
replaces FusedAdam, whose states are the same fp32 exp_avg / exp_avg_sq). The one CPU-only
difference is pinning: `pin_memory` is a no-op on the CPU accelerator, which changes no byte count.

Needs DeepSpeed's shm_comm and cpu_adam ops prebuilt (`python .ci/build_ds_ops.py`); the whole test
takes ~60-90 s on 2 idle cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardtrain.compiler.inventory import tensor_inventory, trainable_params
from shardtrain.compiler.memory import ZeroBuckets, model_state_bytes
from shardtrain.compiler.zero_layout import flat_order_numels, zero12_partitions
from shardtrain.compiler.specs import HardwareSpec, Method, Optimizer, Precision, Strategy
from shardtrain.config.presets import load_model_spec

pytestmark = pytest.mark.multiproc

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "truth" / "engine_bytes.py"
TOL = 0.02
TERMS = ("params", "grads", "master_params", "optimizer_states")
LORA_RANK = 8  # engine_bytes.LORA_RANK, target_modules="all-linear"
WORLD = 2
TIMEOUT_S = 420

# a second model ("large8"): for 8-bit AdamW, tensors above, below and straddling min_8bit_size
# (4096) and sizes that are not multiples of the 256-element quantization block; an odd vocabulary
# so FSDP2 pads dim 0 and ZeRO pads its partitions; a different hidden size (buckets, persistence)
LARGE8 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 96,
    "intermediate_size": 300, "num_attention_heads": 4, "num_key_value_heads": 1,
    "num_hidden_layers": 2, "vocab_size": 3001, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
}

# scenario -> (strategy, precision, method, optimizer, model)
SCENARIOS = {
    "ddp_fp32": (Strategy.DDP, Precision.FP32, Method.FULL, Optimizer.ADAMW, "tiny"),
    "ddp_bf16": (Strategy.DDP, Precision.BF16, Method.FULL, Optimizer.ADAMW, "tiny"),
    "ddp_lora": (Strategy.DDP, Precision.BF16, Method.LORA, Optimizer.ADAMW, "tiny"),
    "ddp_adamw8bit": (Strategy.DDP, Precision.BF16, Method.FULL, Optimizer.ADAMW8BIT, "tiny"),
    "ddp_adamw8bit_large": (Strategy.DDP, Precision.BF16, Method.FULL, Optimizer.ADAMW8BIT, "large8"),
    "fsdp_full_shard": (Strategy.FSDP_FULL_SHARD, Precision.BF16, Method.FULL, Optimizer.ADAMW, "tiny"),
    "fsdp_shard_grad_op": (Strategy.FSDP_SHARD_GRAD_OP, Precision.BF16, Method.FULL, Optimizer.ADAMW, "tiny"),
    "fsdp_lora": (Strategy.FSDP_FULL_SHARD, Precision.BF16, Method.LORA, Optimizer.ADAMW, "tiny"),
    "zero1": (Strategy.ZERO1, Precision.BF16, Method.FULL, Optimizer.ADAMW, "tiny"),
    "zero2": (Strategy.ZERO2, Precision.BF16, Method.FULL, Optimizer.ADAMW, "tiny"),
    "zero3": (Strategy.ZERO3, Precision.BF16, Method.FULL, Optimizer.ADAMW, "tiny"),
    "zero1_fp32": (Strategy.ZERO1, Precision.FP32, Method.FULL, Optimizer.ADAMW, "tiny"),
    "zero2_fp32": (Strategy.ZERO2, Precision.FP32, Method.FULL, Optimizer.ADAMW, "tiny"),
    "zero3_fp32": (Strategy.ZERO3, Precision.FP32, Method.FULL, Optimizer.ADAMW, "tiny"),
    "zero2_offload": (Strategy.ZERO2_OFFLOAD, Precision.BF16, Method.FULL, Optimizer.ADAMW, "tiny"),
    "zero3_offload": (Strategy.ZERO3_OFFLOAD, Precision.BF16, Method.FULL, Optimizer.ADAMW, "tiny"),
    "zero2_offload_fp32": (Strategy.ZERO2_OFFLOAD, Precision.FP32, Method.FULL, Optimizer.ADAMW, "tiny"),
    "zero3_offload_fp32": (Strategy.ZERO3_OFFLOAD, Precision.FP32, Method.FULL, Optimizer.ADAMW, "tiny"),
    "zero3_lora": (Strategy.ZERO3, Precision.BF16, Method.LORA, Optimizer.ADAMW, "tiny"),
    "fsdp_full_shard_large": (Strategy.FSDP_FULL_SHARD, Precision.BF16, Method.FULL, Optimizer.ADAMW, "large8"),
    "zero2_large": (Strategy.ZERO2, Precision.BF16, Method.FULL, Optimizer.ADAMW, "large8"),
    "zero3_large": (Strategy.ZERO3, Precision.BF16, Method.FULL, Optimizer.ADAMW, "large8"),
}


TOL_UNDER = 0.005
"""Issue 19: an under-prediction is an OOM on a GPU, so the band is asymmetric: the plan may be TOL
above the real engine's bytes but only 0.5% below (e.g. a 4-byte optimizer step counter)."""


def _close(measured: int, predicted: int) -> bool:
    if predicted == 0 or measured == 0:
        return measured == predicted
    return -TOL_UNDER * measured <= predicted - measured <= TOL * max(measured, predicted)


def _require_prebuilt_ds_ops() -> None:
    """Two ranks JIT-building the same op at once have hung for minutes: the ops this test loads
    (shm_comm always, cpu_adam for offload) must be built beforehand, in one process."""
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    missing = [op for op in ("deepspeed_shm_comm", "cpu_adam") if not list(root.glob(f"**/{op}/{op}.so"))]
    if missing:
        pytest.fail(f"DeepSpeed ops {missing} are not built under {root}: run "
                    "`python .ci/build_ds_ops.py --no-aio` once before the multiproc tests")


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    _require_prebuilt_ds_ops()
    tmp = tmp_path_factory.mktemp("truth")
    cfg8 = tmp / "large8" / "config.json"
    cfg8.parent.mkdir()
    cfg8.write_text(json.dumps(LARGE8))
    out = tmp / "out"
    models = {"tiny": load_model_spec("tiny-llama"), "large8": load_model_spec(str(cfg8))}
    ds_configs = tmp / "ds_configs.json"
    ds_configs.write_text(json.dumps(_emitted_ds_configs(models)))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(SCRIPT), str(out), "--model", "tiny-llama", "--model8", str(cfg8),
           "--scenarios", ",".join(SCENARIOS), "--ds-configs", str(ds_configs)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    wall = time.time() - t0
    if proc.returncode != 0:
        pytest.fail(f"engine_bytes.py failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    print(f"\nengine_bytes.py: {len(SCENARIOS)} scenarios on {WORLD} ranks in {wall:.1f} s")
    return {"ranks": ranks, "models": models, "wall": wall}


def _emitted_ds_configs(models: dict) -> dict:
    """The DeepSpeed config our emitter writes for each DeepSpeed scenario's plan (micro batch 2,
    world 2), so the engine runs with exactly the buckets/offload blocks a user would get."""
    from shardtrain.compiler.planner import plan
    from shardtrain.compiler.specs import GradCkpt, LoraSpec, TrainSpec
    from shardtrain.emit.deepspeed import deepspeed_config
    out = {}
    for name, (strategy, precision, method, optimizer, model_key) in SCENARIOS.items():
        if strategy.engine.value != "deepspeed":
            continue
        train = TrainSpec(seq_len=16, micro_batch_size=2, global_batch_size=2 * WORLD, precision=precision,
                          method=method, lora=LoraSpec(rank=LORA_RANK, targets="all-linear"),
                          optimizer=optimizer, strategy=strategy, grad_ckpt=GradCkpt.NONE)
        out[name] = deepspeed_config(plan(models[model_key], HardwareSpec(nodes=1, gpus_per_node=WORLD), train))
    return out


def _predict(truth, name):
    strategy, precision, method, optimizer, model_key = SCENARIOS[name]
    model = truth["models"][model_key]
    groups = tensor_inventory(model, method, LORA_RANK, "all-linear")
    hw = HardwareSpec(nodes=1, gpus_per_node=WORLD)
    ms = model_state_bytes(model, groups, strategy, hw, method=method, precision=precision,
                           optimizer=optimizer)
    return model, groups, ms


def _table(name, ms, measured) -> str:
    rows = [f"{name}: term  predicted  " + "  ".join(f"rank{r}" for r in range(WORLD))]
    for t in TERMS:
        rows.append(f"  {t:17s} {getattr(ms, t):>10}  " + "  ".join(f"{m['terms'][t]:>8}" for m in measured))
    rows.append(f"  {'host (offload)':17s} {ms.cpu_bytes:>10}  " + "  ".join(f"{m['host']:>8}" for m in measured))
    return "\n".join(rows)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_model_state_terms_match_real_engine(truth, name):
    model, groups, ms = _predict(truth, name)
    measured = [r[name] for r in truth["ranks"]]
    print("\n" + _table(name, ms, measured))
    strategy, precision, method, _, _ = SCENARIOS[name]
    # the engine trains exactly the tensors the inventory says are trainable
    assert measured[0]["meta"]["trainable"] == trainable_params(groups)
    assert all(m["meta"]["losses"][-1] == m["meta"]["losses"][-1] for m in measured)  # not NaN
    errors = []
    for t in TERMS:
        worst = max(m["terms"][t] for m in measured)
        pred = getattr(ms, t)
        # the plan budgets the worst rank
        if not _close(worst, pred):
            errors.append(f"{t}: predicted {pred}, measured worst rank {worst}")
        for r, m in enumerate(measured):
            want = pred
            if t == "grads" and strategy.zero_stage in (1, 2) and strategy.offload_optimizer.value == "none":
                want = _zero12_rank_grads(model, groups, strategy, precision, r)
            if not _close(m["terms"][t], want):
                errors.append(f"{t}: rank {r} measured {m['terms'][t]}, predicted {want}")
    host = max(m["host"] for m in measured)
    if not _close(host, ms.cpu_bytes):
        errors.append(f"host (offloaded) bytes: predicted {ms.cpu_bytes}, measured {host}")
    assert not errors, "\n".join(errors) + "\n" + _table(name, ms, measured)


def _zero12_rank_grads(model, groups, strategy, precision, rank) -> int:
    """The same rule as memory.model_state_bytes for ZeRO-1/2 gradients, for one given rank (the
    16-bit partition buffer differs between ranks by the tensors straddling their slices)."""
    p = precision.param_bytes
    largest = max(g.numel for g in groups if g.trainable)
    parts = zero12_partitions(flat_order_numels(model, groups), WORLD,
                              ZeroBuckets.for_model(model, trainable_params(groups),
                                                    offload=strategy.offloads).reduce_bucket_elements)
    r = parts[rank]
    backward = r.held_large if strategy.zero_stage == 1 else largest
    return p * r.grad_buffer + max(4 * r.partition, p * backward)


def test_offload_keeps_master_states_off_the_device(truth):
    for name in ("zero2_offload", "zero3_offload", "zero2_offload_fp32", "zero3_offload_fp32"):
        for m in (r[name] for r in truth["ranks"]):
            assert m["terms"]["master_params"] == m["terms"]["optimizer_states"] == 0
            assert m["host_terms"]["master_params"] > 0 and m["host_terms"]["optimizer_states"] > 0
            assert m["meta"]["inner_optimizer"] == "DeepSpeedCPUAdam"


def test_deepspeed_casts_module_to_16_bit(truth):
    """memory.py's DeepSpeed dtype policy: bf16 config -> 16-bit module (also on the CPU
    accelerator), fp32 master partition; without bf16 everything stays fp32."""
    for name, (strategy, precision, *_rest) in SCENARIOS.items():
        if strategy.engine.value != "deepspeed":
            continue
        dtypes = truth["ranks"][0][name]["meta"]["param_dtypes"]
        assert dtypes == (["torch.float32"] if precision is Precision.FP32 else ["torch.bfloat16"]), name
