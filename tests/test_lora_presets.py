"""lora.targets presets (compiler/lora_presets.py): the modules peft / torchtune / axolotl / LLaMA-Factory
adapt by default, checked against the installed peft where it has the default, and through the planner
(trainable parameters follow the preset) and the config (a preset is a valid value; a typo is one line)."""
from __future__ import annotations

import json

import pytest

from shardtrain.cli import main
from shardtrain.compiler.inventory import LoraTargetError, resolve_lora_targets, tensor_inventory, trainable_params
from shardtrain.compiler.lora_presets import LoraPreset, preset_targets
from shardtrain.compiler.specs import Method
from shardtrain.config.presets import load_model_spec

LLAMA = load_model_spec("llama-3.1-8b")
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_presets_on_llama():
    assert resolve_lora_targets(LLAMA, "peft") == ("q_proj", "v_proj")
    assert resolve_lora_targets(LLAMA, ("torchtune",)) == ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                           "down_proj")
    for p in ("axolotl", "llama-factory", "all-linear"):
        assert resolve_lora_targets(LLAMA, p) == ALL7
    assert resolve_lora_targets(LLAMA, ("q_proj", "k_proj")) == ("q_proj", "k_proj")


def test_peft_preset_is_peft_default():
    """The installed peft, given no target_modules, adapts exactly what the peft preset names."""
    pytest.importorskip("peft")
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as M
    for name in ("llama-3.1-8b", "mistral-7b", "qwen2.5-7b", "gemma-2-9b", "mixtral-8x7b"):
        m = load_model_spec(name)
        assert set(preset_targets(m, LoraPreset.PEFT)) == set(M[m.model_type]), name


def test_peft_preset_on_real_peft_model():
    """A tiny Llama wrapped by peft with its own default: the same trainable count as the plan's inventory."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, task_type="CAUSAL_LM"))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    from shardtrain.compiler.model_hf import model_spec_from_hf_config
    spec = model_spec_from_hf_config(cfg.to_dict(), "tiny")
    planned = trainable_params(tensor_inventory(spec, Method.LORA, 4, "peft"))
    assert planned == real


def test_phi3_fused_layout():
    phi = load_model_spec("phi-3-mini")
    # torchtune's q/v/o + MLP on Phi-3's fused qkv_proj / gate_up_proj: the fused modules that hold them
    assert resolve_lora_targets(phi, "torchtune") == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    with pytest.raises(LoraTargetError, match="peft has no default target_modules for model_type 'phi3'"):
        resolve_lora_targets(phi, "peft")


def test_trainable_params_follow_the_preset():
    """8B, r=16: peft's q,v = 32 × 16 × ((4096+4096) + (4096+1024)) = 6.8M; all-linear 42M (hand-computed)."""
    counts = {p: trainable_params(tensor_inventory(LLAMA, Method.LORA, 16, p)) for p in ("peft", "torchtune",
                                                                                         "all-linear")}
    assert counts["peft"] == 32 * 16 * (8192 + 5120)
    per_layer_all = 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096))
    assert counts["all-linear"] == 32 * per_layer_all
    assert counts["peft"] < counts["torchtune"] < counts["all-linear"]


def test_plan_with_preset_flag(capsys):
    out = {}
    for p in ("peft", "all-linear"):
        capsys.readouterr()
        rc = main(["plan", "--model", "llama-3.1-8b", "--gpus-per-node", "1", "--method", "lora", "--seq-len", "2048",
                   "--global-batch", "4", "--set", f"lora.targets={p}", "--json"])
        d = json.loads(capsys.readouterr().out)
        assert rc == 0
        out[p] = d
    assert out["peft"]["lora"]["targets"] == ["q_proj", "v_proj"]
    assert out["peft"]["model"]["trainable_params"] < out["all-linear"]["model"]["trainable_params"]


def test_bad_target_names_presets(capsys):
    rc = main(["plan", "--model", "llama-3.1-8b", "--method", "lora", "--set", "lora.targets=pefft"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1
    assert "pefft" in err[0] and "peft | torchtune | axolotl | llama-factory | all-linear" in err[0]
