"""Bundled presets: model config.json files (configs/models/) and GPU datasheet numbers.

Model presets are the Hugging Face ``config.json`` of each model, so the runtime builds the real
model from the same file the compiler counts. Reading those files is the only I/O here.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path

from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.model_hf import model_spec_from_hf_config

__all__ = [
    "MODELS_DIR",
    "list_model_presets",
    "load_model_config",
    "load_model_spec",
    "GpuPreset",
    "GPU_PRESETS",
    "get_gpu_preset",
    "list_gpu_presets",
]

#: <repo>/configs/models — one ``<preset>.json`` per model.
MODELS_DIR: Path = Path(__file__).resolve().parents[2] / "configs" / "models"

# Spellings that do not reduce to a preset name by _normalize(); values are preset names.
# Only variants with the *same* architecture config are aliased (e.g. Mistral-7B v0.1 has a
# 32000 vocabulary, so only v0.3 maps to "mistral-7b"; Phi-3-mini-128k uses LongRoPE, so only 4k).
_MODEL_ALIASES: dict[str, str] = {
    "mistral-7b-v0.3": "mistral-7b",
    "mixtral-8x7b-v0.1": "mixtral-8x7b",
    "phi-3-mini-4k": "phi-3-mini",
    "llama3.1-8b": "llama-3.1-8b",
}

_DROP_TOKENS = {"instruct", "it", "hf", "chat", "base"}


def list_model_presets() -> list[str]:
    """Sorted preset names (file stems of configs/models/*.json)."""
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


def _normalize(name: str) -> str:
    """'meta-llama/Meta-Llama-3.1-8B-Instruct' -> 'llama-3.1-8b'; 'google/gemma-2-9b-it' ->
    'gemma-2-9b'; 'Qwen/Qwen2.5-7B' -> 'qwen2.5-7b'."""
    s = name.strip().lower().replace("_", "-").replace(" ", "-").rstrip("/")
    s = s.rsplit("/", 1)[-1]                     # drop the hub organisation
    s = re.sub(r"^meta-(?=llama)", "", s)
    s = re.sub(r"^(llama|gemma|phi)-?(\d)", r"\1-\2", s)   # llama3.1 -> llama-3.1, phi3 -> phi-3
    s = "-".join(t for t in s.split("-") if t not in _DROP_TOKENS)
    return _MODEL_ALIASES.get(s, s)


def _looks_like_path(s: str) -> bool:
    return s.endswith(".json") or s.startswith(("/", "./", "../", "~")) or s.count("/") > 1


def _resolve(name_or_path: str) -> tuple[Path, str]:
    """(config.json path, resolved name) for a preset name/alias, a file, or a checkpoint dir."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"model: expected a preset name or a config.json path, "
                         f"got {name_or_path!r}")
    raw = name_or_path.strip()
    p = Path(raw).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ValueError(f"model: directory {str(p)!r} has no config.json")
        return cfg, str(p)
    if p.is_file():
        try:
            if p.resolve().parent == MODELS_DIR:
                return p, p.stem
        except OSError:
            pass
        return p, str(p)
    presets = list_model_presets()
    key = raw.lower()
    if key in presets:
        return MODELS_DIR / f"{key}.json", key
    from shardtrain.config import hub
    norm = _normalize(raw)
    if hub.is_hub_id(raw) and (hub.cached_config(raw) is not None or _normalize(raw.split("@")[0]) not in presets):
        try:
            return hub.resolve_config(raw), raw  # ORG/NAME[@REV]: the Hub's own config.json (cache first)
        except ValueError as e:
            near = difflib.get_close_matches(norm, presets, n=3, cutoff=0.4)
            raise ValueError(f"{e}" + (f"; nearest presets: {', '.join(near)}" if near else "")) from None
    if norm in presets:
        return MODELS_DIR / f"{norm}.json", norm
    if _looks_like_path(raw):
        raise ValueError(f"model: no such file or directory: {raw!r}")
    near = difflib.get_close_matches(norm, presets, n=3, cutoff=0.4)
    hint = f"nearest presets: {', '.join(near)}; " if near else ""
    raise ValueError(f"model: unknown preset {raw!r}; {hint}available: {', '.join(presets)}; "
                     "or pass a config.json path or a local checkpoint directory "
                     "(the Hugging Face Hub is not queried)")


def _read_config(path: Path) -> dict:
    # Any bad file (binary, huge, deeply nested, NaN, ...) -> one ConfigError (a ValueError) naming it.
    from shardtrain.config.safe_io import load_mapping
    return load_mapping(path, fmt="json", what="model config",
                        fix="give a Hugging Face config.json (model_type, hidden_size, num_hidden_layers, ...)")


def load_model_config(name_or_path: str) -> tuple[dict, str]:
    """(parsed config.json, resolved name) for a preset name (case-insensitive; hub ids such as
    "meta-llama/Llama-3.1-8B-Instruct" map to their preset), a config.json path, or a checkpoint
    directory containing config.json. Unknown names raise ValueError listing the nearest presets."""
    path, name = _resolve(name_or_path)
    return _read_config(path), name


def load_model_spec(name_or_path: str) -> ModelSpec:
    """ModelSpec for a preset / config.json path / checkpoint dir (see load_model_config).
    Missing keys raise ValueError naming the key and the file."""
    path, name = _resolve(name_or_path)
    return model_spec_from_hf_config(_read_config(path), name, source=str(path))


# ============================================================================ GPUs
@dataclass(frozen=True)
class GpuPreset:
    """Datasheet numbers for one GPU model (peak values; the cost model applies efficiencies)."""

    name: str
    """Preset key, e.g. "h100-80gb"."""
    memory_bytes: int
    """Device memory as CUDA reports it (nvidia-smi memory.total), before the CUDA context."""
    bf16_tflops: float
    """Dense (no sparsity) 16-bit tensor-core peak, TFLOP/s. BF16 where supported; for GPUs
    without BF16 (V100, ``supports_bf16=False``) this is the FP16 tensor peak."""
    memory_bandwidth_bytes_per_s: float
    """Peak device-memory bandwidth."""
    intra_node_bandwidth_bytes_per_s: float
    """Usable GPU<->GPU bandwidth inside a node, per GPU, one direction (NVLink or PCIe), taken
    as ~80% of the datasheet unidirectional figure."""
    inter_node_bandwidth_bytes_per_s: float
    """Typical usable network bandwidth per GPU across nodes (IB / EFA / Ethernet)."""
    supports_bf16: bool
    """Hardware BF16 (Ampere and newer)."""
    fp16_tflops: float = 0.0
    """Dense FP16 tensor-core peak (FP32 accumulate), TFLOP/s."""
    fp32_tflops: float = 0.0
    """Non-tensor FP32 peak, TFLOP/s (fp32 training without TF32)."""

    def tflops(self, precision: str) -> float:
        """Peak dense TFLOP/s for a training precision: "bf16", "fp16" or "fp32"."""
        p = precision.lower()
        if p == "bf16":
            if not self.supports_bf16:
                raise ValueError(f"gpu {self.name}: no bf16 support; use --precision fp16")
            return self.bf16_tflops
        if p == "fp16":
            return self.fp16_tflops or self.bf16_tflops
        if p == "fp32":
            return self.fp32_tflops
        raise ValueError(f"precision must be bf16, fp16 or fp32, got {precision!r}")


_MiB = 2**20
_G = 1e9
_T = 1e12

# Sources (vendor datasheets / whitepapers):
#  [A100]  NVIDIA A100 Tensor Core GPU datasheet: BF16/FP16 312 TFLOPS dense (624 sparse), FP32
#          19.5; 40GB HBM2 1,555 GB/s; 80GB HBM2e 2,039 GB/s (SXM); NVLink 3 600 GB/s (bidir.).
#  [H100]  NVIDIA H100 datasheet (SXM5): BF16/FP16 1,979 TFLOPS *with sparsity* -> 989 dense,
#          FP32 67; HBM3 3.35 TB/s; NVLink 4 900 GB/s (bidir.). DGX H100: 8x 400 Gb/s NDR.
#  [H200]  NVIDIA H200 datasheet (SXM): same compute as H100 SXM (989 dense BF16), 141 GB HBM3e,
#          4.8 TB/s, NVLink 900 GB/s.
#  [L40S]  NVIDIA L40S datasheet: BF16/FP16 362.05 TFLOPS dense (733 sparse), FP32 91.6;
#          48 GB GDDR6 (ECC) 864 GB/s; PCIe Gen4 x16, no NVLink.
#  [Ada]   NVIDIA Ada GPU architecture whitepaper, RTX 4090: FP16/BF16 tensor with FP32
#          accumulate 165.2 TFLOPS dense, FP32 82.6; 24 GB GDDR6X 1,008 GB/s; no NVLink, and the
#          GeForce driver disables PCIe P2P (transfers staged through host memory).
#  [GA102] NVIDIA Ampere GA102 whitepaper, RTX 3090: FP16/BF16 tensor with FP32 accumulate 71
#          TFLOPS dense (142 with FP16 accumulate), FP32 35.6; 24 GB GDDR6X 936 GB/s.
#  [A10G]  AWS EC2 G5 (A10G, 24 GB, 600 GB/s). NVIDIA publishes no A10G datasheet; its tensor
#          rate is below the A10's (A10 datasheet: 125 BF16 dense); ~70 TFLOPS is the commonly
#          quoted figure — treat as approximate. g5.48xlarge: 100 Gb/s EFA shared by 8 GPUs.
#  [V100]  NVIDIA V100 datasheet (SXM2 32GB): FP16 tensor 125 TFLOPS, FP32 15.7, no BF16;
#          HBM2 900 GB/s; NVLink 2 300 GB/s (bidir.). DGX-1: 4x 100 Gb/s EDR per 8 GPUs.
# memory_bytes: nvidia-smi memory.total as commonly reported for each board (MiB).
# Usable bandwidths: 0.8 x datasheet unidirectional (NVLink: half the bidirectional figure; PCIe
# Gen4 x16: 32 GB/s -> ~25 GB/s); inter-node: 0.8 x per-GPU share of the node's NICs.
GPU_PRESETS: dict[str, GpuPreset] = {g.name: g for g in (
    GpuPreset("a100-40gb", 40960 * _MiB, 312.0, 1555 * _G, 240 * _G, 20 * _G, True,
              fp16_tflops=312.0, fp32_tflops=19.5),                         # [A100] SXM4
    GpuPreset("a100-80gb", 81920 * _MiB, 312.0, 2039 * _G, 240 * _G, 20 * _G, True,
              fp16_tflops=312.0, fp32_tflops=19.5),                         # [A100] SXM4
    GpuPreset("h100-80gb", 81559 * _MiB, 989.0, 3.35 * _T, 360 * _G, 40 * _G, True,
              fp16_tflops=989.0, fp32_tflops=67.0),                         # [H100] SXM5
    GpuPreset("h200", 143771 * _MiB, 989.0, 4.8 * _T, 360 * _G, 40 * _G, True,
              fp16_tflops=989.0, fp32_tflops=67.0),                         # [H200] SXM
    GpuPreset("l40s", 46068 * _MiB, 362.05, 864 * _G, 25 * _G, 5 * _G, True,
              fp16_tflops=362.05, fp32_tflops=91.6),                        # [L40S]
    GpuPreset("rtx4090", 24564 * _MiB, 165.2, 1008 * _G, 20 * _G, 1.5 * _G, True,
              fp16_tflops=165.2, fp32_tflops=82.6),                         # [Ada]
    GpuPreset("rtx3090", 24576 * _MiB, 71.0, 936 * _G, 25 * _G, 1.5 * _G, True,
              fp16_tflops=71.0, fp32_tflops=35.6),                          # [GA102]
    GpuPreset("a10g", 23028 * _MiB, 70.0, 600 * _G, 25 * _G, 1.25 * _G, True,
              fp16_tflops=70.0, fp32_tflops=31.2),                          # [A10G]
    GpuPreset("v100-32gb", 32510 * _MiB, 125.0, 900 * _G, 120 * _G, 5 * _G, False,
              fp16_tflops=125.0, fp32_tflops=15.7),                         # [V100] SXM2
)}

_GPU_ALIASES: dict[str, str] = {
    "h100": "h100-80gb", "h100-sxm": "h100-80gb", "h100-sxm5": "h100-80gb",
    "h100-sxm5-80gb": "h100-80gb", "h100-sxm-80gb": "h100-80gb",
    "h200-141gb": "h200", "h200-sxm": "h200", "h200-sxm-141gb": "h200",
    "a100-sxm4-40gb": "a100-40gb", "a100-sxm4-80gb": "a100-80gb",
    "l40s-48gb": "l40s", "4090": "rtx4090", "rtx-4090": "rtx4090", "geforce-rtx-4090": "rtx4090",
    "3090": "rtx3090", "rtx-3090": "rtx3090", "geforce-rtx-3090": "rtx3090",
    "a10g-24gb": "a10g", "v100": "v100-32gb", "v100-sxm2-32gb": "v100-32gb",
}


def list_gpu_presets() -> list[str]:
    """Sorted GPU preset names."""
    return sorted(GPU_PRESETS)


def get_gpu_preset(name: str) -> GpuPreset:
    """GPU preset by name (case-insensitive; "NVIDIA H100-SXM5-80GB", "4090" ... accepted).
    Unknown names raise ValueError listing the nearest presets."""
    if not isinstance(name, str):
        raise ValueError(f"gpu: expected a preset name, got {name!r}")
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = re.sub(r"^nvidia-", "", key)
    key = _GPU_ALIASES.get(key, key)
    if key in GPU_PRESETS:
        return GPU_PRESETS[key]
    near = difflib.get_close_matches(key, list(GPU_PRESETS), n=3, cutoff=0.3)
    hint = f"nearest: {', '.join(near)}; " if near else ""
    raise ValueError(f"gpu: unknown preset {name!r}; {hint}available: "
                     f"{', '.join(list_gpu_presets())}")
