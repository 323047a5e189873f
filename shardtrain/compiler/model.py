"""ModelSpec: the shape of a decoder-only transformer and its *exact* parameter counts.

Pure Python (no torch / transformers import): the counts are derived from the module layout of
the Hugging Face implementations in transformers 5.23 and checked against real models built on the
meta device in tests/test_model_spec.py. Specs come from a config.json (compiler/model_hf.py, which
documents the layouts per ``model_type``) or from a parameter count (compiler/model_params.py);
both build through :meth:`ModelSpec.build`, so ``param_counts`` here is the only parameter count.

Mixture of experts (transformers 5, ``mixtral``): the router ``MixtralTopKRouter`` holds a plain
``nn.Parameter`` (E, h), *not* an ``nn.Linear``, and the experts ``MixtralExperts`` are two fused
3-D parameters ``gate_up_proj`` (E, 2I, h) and ``down_proj`` (E, h, I) — also *not* ``nn.Linear``.
bitsandbytes' ``replace_with_bnb_linear`` only swaps ``nn.Linear``, so under transformers 5 QLoRA
leaves the experts (and the router) in 16-bit. Hence ``per_layer_linear_params`` counts only real
``nn.Linear`` weights (attention), and the expert weights are reported separately in
``per_layer_expert_params``; ``linear_shapes()`` still lists the experts
(``fused_parameter=True``, ``count_per_layer=num_experts``) because PEFT can target them via
``target_parameters``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["LinearShape", "ModelSpec", "check_positive_int", "param_counts"]

#: ModelSpec fields that param_counts() derives from the dims (never set by hand).
_COUNT_FIELDS = ("embedding_params", "lm_head_params", "per_layer_params",
                 "per_layer_linear_params", "final_norm_params", "num_params",
                 "per_layer_expert_params")


@dataclass(frozen=True)
class LinearShape:
    """One kind of matmul weight inside a decoder layer (for LoRA / QLoRA accounting)."""

    name: str
    """HF module leaf name, e.g. "q_proj", "qkv_proj", "gate_up_proj", "experts.gate_up_proj"."""
    in_features: int
    """Input width of the matmul."""
    out_features: int
    """Output width of the matmul."""
    count_per_layer: int
    """How many such matrices per decoder layer (1, or num_experts for MoE experts)."""
    bias: bool
    """Whether the module has a bias vector (16-bit, never quantized)."""
    fused_parameter: bool = False
    """True when this is a slice of a fused 3-D ``nn.Parameter`` (transformers-5 MoE experts), not
    an ``nn.Linear``: bitsandbytes does not quantize it; PEFT reaches it only via
    ``target_parameters``."""

    @property
    def weight_params(self) -> int:
        """Weight elements over all ``count_per_layer`` copies (bias excluded)."""
        return self.in_features * self.out_features * self.count_per_layer

    @property
    def bias_params(self) -> int:
        """Bias elements over all copies."""
        return self.out_features * self.count_per_layer if self.bias else 0


@dataclass(frozen=True)
class ModelSpec:
    """Shape and exact parameter counts of a decoder-only LM.

    Build one with :func:`~shardtrain.compiler.model_hf.model_spec_from_hf_config`,
    :func:`~shardtrain.compiler.model_params.model_spec_from_params` or
    :meth:`ModelSpec.build`; the count fields are verified in ``__post_init__`` so a hand-edited
    (e.g. ``dataclasses.replace``-d) spec with stale counts is rejected — use
    :meth:`with_dims` instead.
    """

    name: str
    """Preset name, config path, or "custom"."""
    model_type: str
    """HF ``model_type`` (llama, mistral, mixtral, qwen2, gemma2, phi3, or other llama-like)."""
    hidden_size: int
    """Residual stream width h."""
    num_layers: int
    """Number of decoder layers L."""
    num_heads: int
    """Attention (query) heads."""
    num_kv_heads: int
    """Key/value heads (GQA); == num_heads for MHA."""
    head_dim: int
    """Per-head width (not always hidden/heads: Gemma-2-9B uses 256 with h=3584, 16 heads)."""
    intermediate_size: int
    """MLP inner width I (per expert for MoE)."""
    vocab_size: int
    """Vocabulary size V (rows of the embedding / lm_head)."""
    tie_word_embeddings: bool
    """lm_head shares the input embedding weight."""
    embedding_params: int
    """Input embedding elements, V*h."""
    lm_head_params: int
    """Output projection elements, V*h, or 0 when tied."""
    per_layer_params: int
    """All parameters of one decoder layer (linears, biases, norms, router, experts)."""
    per_layer_linear_params: int
    """Weights of real ``nn.Linear`` modules in one layer (what bitsandbytes 4-bit quantizes);
    biases excluded (they stay 16-bit); fused MoE experts excluded (see per_layer_expert_params)."""
    final_norm_params: int
    """Final norm elements (h)."""
    num_params: int
    """Exact total, == sum(p.numel() for p in model.parameters()) (tied weights counted once)."""
    num_experts: int = 1
    """MoE: experts per layer, all resident in memory (1 for dense models)."""
    experts_per_token: int = 1
    """MoE: top-k experts evaluated per token."""
    decoder_layer_class: str = "LlamaDecoderLayer"
    """HF class name of the decoder block (FSDP wrap / checkpointing unit)."""
    per_layer_expert_params: int = 0
    """MoE: elements of the fused 3-D expert parameters in one layer (not nn.Linear; 16-bit under
    QLoRA in transformers 5)."""
    attention_qkv_bias: bool = False
    """q/k/v projections carry a bias (Qwen2; Llama/Gemma-2 with attention_bias)."""
    attention_out_bias: bool = False
    """o_proj carries a bias (Llama/Gemma-2 with attention_bias)."""
    mlp_bias: bool = False
    """MLP projections carry a bias (Llama with mlp_bias)."""
    fused_qkv: bool = False
    """One qkv_proj instead of q/k/v (Phi-3)."""
    fused_gate_up: bool = False
    """One gate_up_proj instead of gate/up (Phi-3)."""
    norms_per_layer: int = 2
    """RMSNorm vectors (each h) per layer: 2, Gemma-2: 4."""
    max_position_embeddings: int | None = None
    """Context length the config declares (None if unknown)."""
    notes: tuple[str, ...] = ()
    """Assumptions made while building the spec (e.g. unknown model_type treated as llama-like)."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, *, name: str, model_type: str, hidden_size: int, num_layers: int, num_heads: int,
              num_kv_heads: int, intermediate_size: int, vocab_size: int,
              tie_word_embeddings: bool = False, head_dim: int | None = None, **layout: Any
              ) -> "ModelSpec":
        """Make a spec from dimensions and layout flags, computing every count."""
        if head_dim is None:
            check_positive_int("num_heads", num_heads)
            head_dim = hidden_size // num_heads
        dims = dict(name=name, model_type=model_type, hidden_size=hidden_size,
                    num_layers=num_layers,
                    num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                    intermediate_size=intermediate_size, vocab_size=vocab_size,
                    tie_word_embeddings=tie_word_embeddings, **layout)
        return cls(**dims, **param_counts(dims))

    def __post_init__(self) -> None:
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "vocab_size", "num_experts", "experts_per_token",
                  "norms_per_layer"):
            check_positive_int(k, getattr(self, k))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} exceeds "
                             f"num_experts={self.num_experts}")
        expected = param_counts({f.name: getattr(self, f.name) for f in fields(self)})
        bad = {k: (getattr(self, k), v) for k, v in expected.items() if getattr(self, k) != v}
        if bad:
            desc = ", ".join(f"{k}={got} (expected {want})" for k, (got, want) in bad.items())
            raise ValueError(f"ModelSpec {self.name!r}: counts inconsistent with its dims: {desc}; "
                             "build specs with ModelSpec.build() or spec.with_dims()")

    def with_dims(self, **changes: Any) -> "ModelSpec":
        """Copy with some dims / layout flags changed and all counts recomputed."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _COUNT_FIELDS}
        d.update(changes)
        return ModelSpec(**d, **param_counts(d))

    # ------------------------------------------------------------------ derived
    def linear_shapes(self) -> tuple[LinearShape, ...]:
        """Matmul weights of ONE decoder layer, in module order.

        Includes MoE experts as ``fused_parameter=True`` entries (count_per_layer = num_experts);
        the Mixtral router is a bare parameter in transformers 5 and is not listed.
        """
        return _layer_shapes(vars(self))

    @property
    def is_moe(self) -> bool:
        """True for mixture-of-experts models."""
        return self.num_experts > 1

    @property
    def per_layer_router_params(self) -> int:
        """MoE router weight elements per layer (E*h; a bare parameter in transformers 5)."""
        return self.num_experts * self.hidden_size if self.is_moe else 0

    @property
    def active_params(self) -> int:
        """Parameters touched per token (MoE: only top-k experts count); == num_params if dense."""
        if not self.is_moe:
            return self.num_params
        idle = self.per_layer_expert_params * (self.num_experts - self.experts_per_token)
        return self.num_params - self.num_layers * idle // self.num_experts

    @property
    def layer_norm_params(self) -> int:
        """Norm weight elements in one layer."""
        return self.norms_per_layer * self.hidden_size

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError; counts are re-verified."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelSpec.from_dict: unknown keys {unknown}")
        kw = dict(d)
        if "notes" in kw:
            kw["notes"] = tuple(kw["notes"])
        return cls(**kw)

    def to_hf_config(self) -> dict[str, Any]:
        """A config.json dict transformers can build this model from (llama-like layouts only)."""
        if self.model_type != "llama" or self.fused_qkv or self.fused_gate_up or self.is_moe \
                or self.norms_per_layer != 2 or self.attention_qkv_bias != self.attention_out_bias:
            raise ValueError(f"to_hf_config: only plain llama layouts are supported, "
                             f"not {self.model_type!r}; load the original config.json instead")
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_qkv_bias, "mlp_bias": self.mlp_bias,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": self.max_position_embeddings or 4096,
        }


def check_positive_int(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{key} must be a positive integer, got {v!r}")


def _layer_shapes(d: Mapping[str, Any]) -> tuple[LinearShape, ...]:
    """The matmul weights of one decoder layer from dims + layout flags (dict of ModelSpec field
    values): the one description of the layer layout that linear_shapes() and param_counts() share."""
    h, hd, I = d["hidden_size"], d["head_dim"], d["intermediate_size"]
    q, kv = d["num_heads"] * hd, d["num_kv_heads"] * hd
    qkv_b, o_b = d.get("attention_qkv_bias", False), d.get("attention_out_bias", False)
    mlp_b = d.get("mlp_bias", False)
    out: list[LinearShape] = []
    if d.get("fused_qkv", False):
        out.append(LinearShape("qkv_proj", h, q + 2 * kv, 1, qkv_b))
    else:
        out += [LinearShape("q_proj", h, q, 1, qkv_b),
                LinearShape("k_proj", h, kv, 1, qkv_b),
                LinearShape("v_proj", h, kv, 1, qkv_b)]
    out.append(LinearShape("o_proj", q, h, 1, o_b))
    E = d.get("num_experts", 1)
    if E > 1:
        # MixtralExperts: gate_up_proj (E, 2I, h) + down_proj (E, h, I), never biased
        out += [LinearShape("experts.gate_up_proj", h, 2 * I, E, False, fused_parameter=True),
                LinearShape("experts.down_proj", I, h, E, False, fused_parameter=True)]
    elif d.get("fused_gate_up", False):
        out += [LinearShape("gate_up_proj", h, 2 * I, 1, mlp_b),
                LinearShape("down_proj", I, h, 1, mlp_b)]
    else:
        out += [LinearShape("gate_proj", h, I, 1, mlp_b),
                LinearShape("up_proj", h, I, 1, mlp_b),
                LinearShape("down_proj", I, h, 1, mlp_b)]
    return tuple(out)


def param_counts(d: Mapping[str, Any]) -> dict[str, int]:
    """All count fields from dims + layout flags (dict of ModelSpec field values): THE parameter
    count — every other count in shardtrain (presets, --params shape inference) calls this."""
    h, L, V = d["hidden_size"], d["num_layers"], d["vocab_size"]
    shapes = _layer_shapes(d)
    linear = sum(s.weight_params for s in shapes if not s.fused_parameter)
    expert = sum(s.weight_params for s in shapes if s.fused_parameter)
    biases = sum(s.bias_params for s in shapes)
    E = d.get("num_experts", 1)
    router = E * h if E > 1 else 0             # MixtralTopKRouter.weight (E,h)
    norms = d.get("norms_per_layer", 2) * h
    per_layer = linear + biases + expert + router + norms
    emb = V * h
    lm_head = 0 if d["tie_word_embeddings"] else V * h
    final_norm = h
    return {
        "embedding_params": emb,
        "lm_head_params": lm_head,
        "per_layer_params": per_layer,
        "per_layer_linear_params": linear,
        "per_layer_expert_params": expert,
        "final_norm_params": final_norm,
        "num_params": emb + lm_head + L * per_layer + final_norm,
    }
