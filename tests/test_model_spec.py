"""ModelSpec counts are exact: checked against real HF models built on the meta device."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from shardtrain.compiler.model import LinearShape, ModelSpec
from shardtrain.compiler.model_hf import model_spec_from_hf_config
from shardtrain.compiler.model_params import model_spec_from_params
from shardtrain.config.presets import MODELS_DIR, list_model_presets, load_model_config, \
    load_model_spec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn = torch.nn

PRESETS = list_model_presets()


def _build_meta(cfg: dict):
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_against_model(spec: ModelSpec, model) -> None:
    assert spec.num_params == _numel(model)          # parameters() dedups tied weights
    layers = model.model.layers
    assert len(layers) == spec.num_layers
    layer0 = layers[0]
    assert spec.decoder_layer_class == type(layer0).__name__
    assert {type(layer).__name__ for layer in layers} == {spec.decoder_layer_class}
    assert spec.per_layer_params == _numel(layer0)
    assert sum(_numel(layer) for layer in layers) == spec.num_layers * spec.per_layer_params
    assert spec.embedding_params == model.get_input_embeddings().weight.numel()
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied == spec.tie_word_embeddings
    assert spec.lm_head_params == (0 if tied else model.lm_head.weight.numel())
    assert spec.final_norm_params == _numel(model.model.norm)
    norms = [m for m in layer0.modules() if type(m).__name__.endswith("RMSNorm")]
    assert len(norms) == spec.norms_per_layer
    assert sum(_numel(m) for m in norms) == spec.layer_norm_params

    # nn.Linear modules of layer 0 <-> non-fused linear_shapes
    linears = {n: m for n, m in layer0.named_modules() if type(m) is nn.Linear}
    assert sum(m.weight.numel() for m in linears.values()) == spec.per_layer_linear_params
    got = sorted((n.rsplit(".", 1)[-1], m.in_features, m.out_features, m.bias is not None)
                 for n, m in linears.items())
    shapes = spec.linear_shapes()
    want = sorted((s.name, s.in_features, s.out_features, s.bias)
                  for s in shapes if not s.fused_parameter)
    assert got == want
    assert all(s.count_per_layer == 1 for s in shapes if not s.fused_parameter)

    # fused 3-D expert parameters (transformers 5 MoE) <-> fused linear_shapes
    params = dict(layer0.named_parameters())
    fused = [s for s in shapes if s.fused_parameter]
    for s in fused:
        (pname,) = [n for n in params if n.endswith(s.name)]
        assert tuple(params[pname].shape) == (s.count_per_layer, s.out_features, s.in_features)
    assert sum(s.weight_params for s in fused) == spec.per_layer_expert_params
    # everything else in the layer is a bias, a norm, or the router
    biases = sum(s.bias_params for s in shapes)
    assert spec.per_layer_params == (spec.per_layer_linear_params + spec.per_layer_expert_params
                                     + biases + spec.layer_norm_params
                                     + spec.per_layer_router_params)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_counts_match_transformers(name):
    cfg, resolved = load_model_config(name)
    assert resolved == name
    spec = model_spec_from_hf_config(cfg, name)
    assert spec.model_type == cfg["model_type"]
    assert spec.notes == ()
    _check_against_model(spec, _build_meta(cfg))


def test_every_required_preset_is_bundled():
    assert set(PRESETS) >= {
        "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "llama-3.2-1b", "llama-3.2-3b",
        "mistral-7b", "mixtral-8x7b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-72b", "gemma-2-9b",
        "gemma-2-27b", "phi-3-mini", "tiny-llama"}


# Totals published on the model cards / papers (rounded as published).
@pytest.mark.parametrize("name,billions,rel", [
    ("llama-3.1-8b", 8.03, 0.002), ("llama-3.1-70b", 70.6, 0.002), ("llama-3.1-405b", 405.9, 0.002),
    ("llama-3.2-1b", 1.24, 0.005), ("llama-3.2-3b", 3.21, 0.005), ("mistral-7b", 7.25, 0.002),
    ("mixtral-8x7b", 46.7, 0.002), ("qwen2.5-7b", 7.61, 0.002), ("qwen2.5-14b", 14.7, 0.005),
    ("qwen2.5-72b", 72.7, 0.002), ("gemma-2-9b", 9.24, 0.002), ("gemma-2-27b", 27.2, 0.002),
    ("phi-3-mini", 3.82, 0.002),
])
def test_model_card_sizes(name, billions, rel):
    assert load_model_spec(name).num_params == pytest.approx(billions * 1e9, rel=rel)


def test_exact_known_totals():
    assert load_model_spec("llama-3.1-8b").num_params == 8_030_261_248
    assert load_model_spec("llama-3.1-405b").num_params == 405_853_388_800
    tiny = load_model_spec("tiny-llama")
    assert (tiny.hidden_size, tiny.num_layers, tiny.num_heads, tiny.num_kv_heads,
            tiny.intermediate_size, tiny.vocab_size) == (128, 2, 4, 2, 256, 512)


def test_layout_specifics():
    qwen = load_model_spec("qwen2.5-7b")
    assert (qwen.attention_qkv_bias, qwen.attention_out_bias) == (True, False)
    gemma = load_model_spec("gemma-2-9b")
    assert gemma.norms_per_layer == 4 and gemma.tie_word_embeddings and gemma.lm_head_params == 0
    assert gemma.head_dim == 256 and gemma.num_heads * gemma.head_dim != gemma.hidden_size
    phi = load_model_spec("phi-3-mini")
    assert [s.name for s in phi.linear_shapes()] == ["qkv_proj", "o_proj", "gate_up_proj",
                                                     "down_proj"]
    mix = load_model_spec("mixtral-8x7b")
    assert mix.is_moe and (mix.num_experts, mix.experts_per_token) == (8, 2)
    assert mix.decoder_layer_class == "MixtralDecoderLayer"
    experts = [s for s in mix.linear_shapes() if s.fused_parameter]
    assert [(s.name, s.count_per_layer) for s in experts] == [("experts.gate_up_proj", 8),
                                                              ("experts.down_proj", 8)]
    assert mix.active_params == pytest.approx(12.9e9, rel=0.01)   # "12.9B active" (Mistral AI)
    assert load_model_spec("llama-3.1-8b").active_params == load_model_spec("llama-3.1-8b").num_params


def test_llama_biases_follow_config():
    cfg, _ = load_model_config("tiny-llama")
    cfg = dict(cfg, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    spec = model_spec_from_hf_config(cfg)
    assert all(s.bias for s in spec.linear_shapes())
    _check_against_model(spec, _build_meta(cfg))


def test_unknown_llama_like_model_type_is_counted_as_llama_and_noted():
    cfg, _ = load_model_config("tiny-llama")
    cfg = dict(cfg, model_type="granite", architectures=["GraniteForCausalLM"])
    spec = model_spec_from_hf_config(cfg, "granite-test")
    assert spec.model_type == "granite"
    assert any("Llama layout" in n for n in spec.notes)
    assert spec.decoder_layer_class == "GraniteDecoderLayer"
    _check_against_model(spec, _build_meta(cfg))


def test_unknown_moe_model_type_is_rejected():
    cfg, _ = load_model_config("tiny-llama")
    cfg = dict(cfg, model_type="somemoe", num_experts=4)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        model_spec_from_hf_config(cfg)


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "intermediate_size", "vocab_size", "model_type"])
def test_missing_key_names_key_and_file(key, tmp_path):
    cfg, _ = load_model_config("tiny-llama")
    del cfg[key]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as e:
        load_model_spec(str(path))
    assert key in str(e.value) and str(path) in str(e.value)


def test_missing_mixtral_key():
    cfg, _ = load_model_config("mixtral-8x7b")
    del cfg["num_local_experts"]
    with pytest.raises(ValueError, match="num_local_experts"):
        model_spec_from_hf_config(cfg, source="x/config.json")


def test_bad_values_rejected():
    cfg, _ = load_model_config("tiny-llama")
    with pytest.raises(ValueError, match="hidden_size"):
        model_spec_from_hf_config(dict(cfg, hidden_size=-1))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        model_spec_from_hf_config(dict(cfg, num_key_value_heads=3))


def test_spec_is_frozen_and_round_trips():
    spec = load_model_spec("mixtral-8x7b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.num_layers = 3  # type: ignore[misc]
    d = spec.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert ModelSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="unknown keys"):
        ModelSpec.from_dict(dict(d, bogus=1))


def test_stale_counts_rejected_and_with_dims_recomputes():
    spec = load_model_spec("llama-3.1-8b")
    with pytest.raises(ValueError, match="inconsistent"):
        dataclasses.replace(spec, num_layers=16)
    half = spec.with_dims(num_layers=16)
    assert half.num_params == spec.num_params - 16 * spec.per_layer_params


def test_linear_shape_helpers():
    s = LinearShape("experts.w1", 4, 8, 3, True)
    assert (s.weight_params, s.bias_params, s.fused_parameter) == (96, 24, False)


def test_build_matches_hf_config_path():
    a = load_model_spec("qwen2.5-7b")
    b = ModelSpec.build(name=a.name, model_type="qwen2", hidden_size=3584, num_layers=28,
                        num_heads=28, num_kv_heads=4, intermediate_size=18944, vocab_size=152064,
                        attention_qkv_bias=True, decoder_layer_class="Qwen2DecoderLayer",
                        max_position_embeddings=131072)
    assert a == b


# ------------------------------------------------------------------ --params inference
@pytest.mark.parametrize("n", [1e7, 1.25e8, 1e9, 3e9, 7.5e9, 13e9, 34e9, 70e9, 180e9, 405e9, 1e12])
def test_from_params_within_2_percent(n):
    spec = model_spec_from_params(n)
    assert spec.num_params == pytest.approx(n, rel=0.02)
    assert spec.model_type == "llama" and spec.hidden_size % spec.num_heads == 0
    assert spec.num_heads % spec.num_kv_heads == 0


def test_from_params_7_5b():
    spec = model_spec_from_params(7.5e9)
    assert abs(spec.num_params - 7.5e9) <= 0.02 * 7.5e9
    assert spec.name == "custom" and spec.decoder_layer_class == "LlamaDecoderLayer"


def test_from_params_honours_dims():
    spec = model_spec_from_params(7.5e9, hidden_size=4096, num_heads=32, num_kv_heads=8,
                                  vocab_size=128256)
    assert (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.vocab_size, spec.name) == \
        (4096, 32, 8, 128256, "custom")
    assert spec.num_params == pytest.approx(7.5e9, rel=0.02)
    s2 = model_spec_from_params(7.5e9, num_layers=20, intermediate_size=14336)
    assert (s2.num_layers, s2.intermediate_size) == (20, 14336)
    assert s2.num_params == pytest.approx(7.5e9, rel=0.02)
    s3 = model_spec_from_params(7.5e9, hidden_size=4096, num_layers=8)   # MLP width re-solved
    assert s3.num_layers == 8 and s3.num_params == pytest.approx(7.5e9, rel=0.02)
    s4 = model_spec_from_params(7e9, hidden_size=4096, num_layers=32, intermediate_size=11008)
    assert s4.num_params == 6_738_415_616                                # Llama-2-7B exactly
    s5 = model_spec_from_params(70e9)
    assert (s5.hidden_size, s5.num_heads, s5.num_kv_heads, s5.intermediate_size) == \
        (8192, 64, 8, 28672)
    s6 = model_spec_from_params(7.5e9, num_heads=40)
    assert s6.num_heads == 40 and s6.num_params == pytest.approx(7.5e9, rel=0.02)


@pytest.mark.parametrize("kwargs,bad", [
    (dict(hidden_size=4096, num_heads=30), "num_heads"),
    (dict(num_heads=32, num_kv_heads=5), "num_kv_heads"),
    (dict(hidden_size=4096, num_kv_heads=3), "num_kv_heads"),
    (dict(hidden_size=65536), "hidden_size"),
    (dict(hidden_size=4096, num_layers=400), "num_layers"),
    (dict(num_layers=0), "num_layers"),
    (dict(intermediate_size=-5), "intermediate_size"),
    (dict(vocab_size=1.5), "vocab_size"),
    (dict(hidden_size=4096, num_layers=8, intermediate_size=11008), "num_params"),
    (dict(hidden_size=4096, vocab_size=10**6), "hidden_size"),
])
def test_from_params_inconsistent_dims(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        model_spec_from_params(7.5e9, **kwargs)


@pytest.mark.parametrize("n", [0, -1, float("nan"), float("inf"), "7e9"])
def test_from_params_bad_num_params(n):
    with pytest.raises(ValueError, match="num_params"):
        model_spec_from_params(n)  # type: ignore[arg-type]


def test_from_params_builds_in_transformers():
    spec = model_spec_from_params(2e8, num_layers=6)
    model = _build_meta(spec.to_hf_config())
    _check_against_model(spec, model)


def test_model_module_imports_without_torch():
    code = ("import sys, time; t = time.perf_counter(); import shardtrain.compiler.model, shardtrain.compiler.model_hf, "
            "shardtrain.compiler.model_params; "
            "dt = time.perf_counter() - t; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "print(dt)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # < 50 ms is the target with bytecode caching; allow slack for a loaded CI machine without it
    assert float(out.stdout) < 0.5


def test_presets_dir_is_repo_configs():
    assert MODELS_DIR.name == "models" and MODELS_DIR.parent.name == "configs"
