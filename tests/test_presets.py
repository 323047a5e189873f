"""Model and GPU presets: lookup, aliases, error messages, datasheet sanity."""
from __future__ import annotations

import json
import shutil

import pytest

from shardtrain.config.presets import (
    GPU_PRESETS,
    MODELS_DIR,
    GpuPreset,
    get_gpu_preset,
    list_gpu_presets,
    list_model_presets,
    load_model_config,
    load_model_spec,
)

GiB = 2**30


def test_models_dir_and_listing():
    assert MODELS_DIR.is_dir()
    names = list_model_presets()
    assert names == sorted(names) and "llama-3.1-8b" in names and "tiny-llama" in names
    assert all((MODELS_DIR / f"{n}.json").is_file() for n in names)


@pytest.mark.parametrize("name", list_model_presets())
def test_preset_files_are_hf_configs(name):
    cfg = json.loads((MODELS_DIR / f"{name}.json").read_text())
    for key in ("model_type", "architectures", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size",
                "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
                "hidden_act"):
        assert key in cfg, (name, key)
    assert "auto_map" not in cfg            # native classes only; never trust_remote_code
    assert cfg["architectures"][0].endswith("ForCausalLM")


def test_llama31_rope_scaling_kept():
    cfg, _ = load_model_config("llama-3.1-8b")
    assert cfg["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192,
                                   "rope_type": "llama3"}
    cfg, _ = load_model_config("llama-3.2-1b")
    assert cfg["rope_scaling"]["factor"] == 32.0 and cfg["tie_word_embeddings"] is True


@pytest.mark.parametrize("alias,preset", [
    ("LLAMA-3.1-8B", "llama-3.1-8b"),
    ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
    ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama-3.1-70b"),
    ("meta-llama/Llama-3.1-405B", "llama-3.1-405b"),
    ("meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-1b"),
    ("llama3.2-3b", "llama-3.2-3b"),
    ("mistralai/Mistral-7B-v0.3", "mistral-7b"),
    ("mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b"),
    ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b"),
    ("Qwen/Qwen2.5-72B-Instruct", "qwen2.5-72b"),
    ("google/gemma-2-27b-it", "gemma-2-27b"),
    ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini"),
])
def test_aliases(alias, preset):
    cfg, name = load_model_config(alias)
    assert name == preset
    assert cfg == load_model_config(preset)[0]


@pytest.mark.parametrize("bad,nearest", [
    ("llama-3.1-7b", "llama-3.1-8b"),
    ("qwen2.5-8b", "qwen2.5-7b"),
    ("mistralai/Mistral-7B-v0.1", "mistral-7b"),     # different vocab: not silently aliased
    ("gemma2-9", "gemma-2-9b"),
])
def test_unknown_preset_names_nearest(bad, nearest):
    with pytest.raises(ValueError) as e:
        load_model_config(bad)
    msg = str(e.value)
    assert "nearest presets" in msg and nearest in msg and repr(bad) in msg


def test_unknown_preset_without_close_match_lists_all():
    with pytest.raises(ValueError) as e:
        load_model_spec("zzzz")
    assert "tiny-llama" in str(e.value)


def test_config_path_and_checkpoint_dir(tmp_path):
    src = MODELS_DIR / "tiny-llama.json"
    cfg, name = load_model_config(str(src))
    assert name == "tiny-llama"                        # a bundled file resolves to its preset
    f = tmp_path / "my.json"
    shutil.copy(src, f)
    cfg2, name2 = load_model_config(str(f))
    assert cfg2 == cfg and name2 == str(f)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(src, ckpt / "config.json")
    spec = load_model_spec(str(ckpt))
    assert spec.name == str(ckpt) and spec.num_params == load_model_spec("tiny-llama").num_params


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_model_config(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="no config.json"):
        load_model_config(str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON") as e:
        load_model_config(str(bad))
    assert str(bad) in str(e.value)
    lst = tmp_path / "list.json"
    lst.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        load_model_config(str(lst))
    with pytest.raises(ValueError):
        load_model_config("")


def test_load_model_spec_names():
    assert load_model_spec("Qwen/Qwen2.5-7B").name == "qwen2.5-7b"


# ------------------------------------------------------------------ GPUs
def test_gpu_presets_complete():
    assert set(GPU_PRESETS) == {"a100-40gb", "a100-80gb", "h100-80gb", "h200", "l40s", "rtx4090",
                                "rtx3090", "a10g", "v100-32gb"}
    assert list_gpu_presets() == sorted(GPU_PRESETS)
    for name, g in GPU_PRESETS.items():
        assert isinstance(g, GpuPreset) and g.name == name
        assert g.memory_bytes > 0 and g.bf16_tflops > 0 and g.fp32_tflops > 0
        assert g.memory_bandwidth_bytes_per_s > g.intra_node_bandwidth_bytes_per_s \
            >= g.inter_node_bandwidth_bytes_per_s > 0


@pytest.mark.parametrize("name,gib", [
    ("a100-40gb", 40), ("a100-80gb", 80), ("h100-80gb", 80), ("h200", 141), ("l40s", 48),
    ("rtx4090", 24), ("rtx3090", 24), ("a10g", 24), ("v100-32gb", 32),
])
def test_gpu_memory_sizes(name, gib):
    assert get_gpu_preset(name).memory_bytes == pytest.approx(gib * GiB, rel=0.07)


def test_gpu_datasheet_values():
    assert get_gpu_preset("a100-80gb").bf16_tflops == 312
    assert get_gpu_preset("h100-80gb").bf16_tflops == pytest.approx(989, rel=0.01)
    assert get_gpu_preset("h200").memory_bandwidth_bytes_per_s == pytest.approx(4.8e12)
    assert get_gpu_preset("h100-80gb").intra_node_bandwidth_bytes_per_s > \
        get_gpu_preset("a100-80gb").intra_node_bandwidth_bytes_per_s > \
        get_gpu_preset("l40s").intra_node_bandwidth_bytes_per_s


def test_v100_has_no_bf16():
    v = get_gpu_preset("v100-32gb")
    assert v.supports_bf16 is False
    assert all(g.supports_bf16 for n, g in GPU_PRESETS.items() if n != "v100-32gb")
    with pytest.raises(ValueError, match="bf16"):
        v.tflops("bf16")
    assert v.tflops("fp16") == 125
    assert get_gpu_preset("h100-80gb").tflops("BF16") == get_gpu_preset("h100-80gb").bf16_tflops
    with pytest.raises(ValueError, match="precision"):
        v.tflops("int8")


@pytest.mark.parametrize("alias,name", [
    ("H100-80GB", "h100-80gb"), ("NVIDIA H100", "h100-80gb"), ("h100_sxm", "h100-80gb"),
    ("A100-40GB", "a100-40gb"), ("4090", "rtx4090"), ("RTX 3090", "rtx3090"), ("V100", "v100-32gb"),
    ("L40S", "l40s"), ("A10G", "a10g"), ("H200", "h200"),
])
def test_gpu_lookup(alias, name):
    assert get_gpu_preset(alias).name == name


def test_gpu_unknown_names_nearest():
    with pytest.raises(ValueError) as e:
        get_gpu_preset("a100")
    assert "a100-80gb" in str(e.value) and "a100-40gb" in str(e.value)
    with pytest.raises(ValueError, match="h100-80gb"):
        get_gpu_preset("h100-94gb")


def test_gpu_preset_frozen():
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_gpu_preset("h200").memory_bytes = 1  # type: ignore[misc]
