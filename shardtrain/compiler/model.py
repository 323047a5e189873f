"""ModelSpec: the shape of a decoder-only transformer and its *exact* parameter counts.

Pure Python (no torch / transformers import): the counts are derived from the module layout of
the Hugging Face implementations in transformers 5.23 and checked against real models built on the
meta device in tests/test_model_spec.py.

Layouts handled exactly (``model_type``):

* ``llama`` / ``mistral`` / ``qwen2`` — q/k/v/o projections, SwiGLU MLP (gate/up/down), 2 RMSNorms
  per layer. Llama: ``attention_bias`` applies to q, k, v *and* o; ``mlp_bias`` to the MLP.
  Mistral: never biased. Qwen2: q/k/v always biased, o never (ignores ``attention_bias``).
* ``gemma2`` — as Llama (``attention_bias`` on q/k/v/o) plus 4 RMSNorms per layer
  (input, post_attention, pre_feedforward, post_feedforward); ``head_dim`` is explicit and
  ``hidden != heads * head_dim`` is normal (9B: 3584 vs 16 * 256); embeddings tied by default.
* ``phi3`` — fused ``qkv_proj`` and ``gate_up_proj``; no biases.
* ``mixtral`` — attention as Mistral; the MoE block (``layer.mlp``) has a router
  ``MixtralTopKRouter`` whose weight is a plain ``nn.Parameter`` (E, h), *not* an ``nn.Linear``, and
  experts ``MixtralExperts`` stored as two fused 3-D parameters ``gate_up_proj`` (E, 2I, h) and
  ``down_proj`` (E, h, I) — also *not* ``nn.Linear``. bitsandbytes' ``replace_with_bnb_linear``
  only swaps ``nn.Linear``, so under transformers 5 QLoRA leaves the experts (and the router) in
  16-bit. Hence ``per_layer_linear_params`` counts only real ``nn.Linear`` weights (attention), and
  the expert weights are reported separately in ``per_layer_expert_params``; ``linear_shapes()``
  still lists the experts (``fused_parameter=True``, ``count_per_layer=num_experts``) because PEFT
  can target them via ``target_parameters``.

Any other ``model_type`` carrying the standard Llama keys is treated as Llama-like (recorded in
``notes``); a mixture-of-experts config of an unknown type is rejected rather than miscounted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from collections.abc import Mapping

__all__ = [
    "LinearShape",
    "ModelSpec",
    "model_spec_from_hf_config",
    "model_spec_from_params",
    "KNOWN_MODEL_TYPES",
]

#: model_type -> HF decoder-layer class name, for the layouts counted exactly.
KNOWN_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaDecoderLayer",
    "mistral": "MistralDecoderLayer",
    "mixtral": "MixtralDecoderLayer",
    "qwen2": "Qwen2DecoderLayer",
    "gemma2": "Gemma2DecoderLayer",
    "phi3": "Phi3DecoderLayer",
}

# Default of `tie_word_embeddings` per config class in transformers 5 (PreTrainedConfig's own
# default is False; Gemma2Config sets True).
_TIE_DEFAULT = {"gemma2": True}


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

    Build one with :func:`model_spec_from_hf_config`, :func:`model_spec_from_params` or
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
            _check_positive("num_heads", num_heads)
            head_dim = hidden_size // num_heads
        dims = dict(name=name, model_type=model_type, hidden_size=hidden_size,
                    num_layers=num_layers,
                    num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                    intermediate_size=intermediate_size, vocab_size=vocab_size,
                    tie_word_embeddings=tie_word_embeddings, **layout)
        return cls(**dims, **_counts(dims))

    def __post_init__(self) -> None:
        for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "vocab_size", "num_experts", "experts_per_token",
                  "norms_per_layer"):
            _check_positive(k, getattr(self, k))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads}")
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} exceeds "
                             f"num_experts={self.num_experts}")
        expected = _counts({f.name: getattr(self, f.name) for f in fields(self)})
        bad = {k: (getattr(self, k), v) for k, v in expected.items() if getattr(self, k) != v}
        if bad:
            desc = ", ".join(f"{k}={got} (expected {want})" for k, (got, want) in bad.items())
            raise ValueError(f"ModelSpec {self.name!r}: counts inconsistent with its dims: {desc}; "
                             "build specs with ModelSpec.build() or spec.with_dims()")

    def with_dims(self, **changes: Any) -> "ModelSpec":
        """Copy with some dims / layout flags changed and all counts recomputed."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _COUNT_FIELDS}
        d.update(changes)
        return ModelSpec(**d, **_counts(d))

    # ------------------------------------------------------------------ derived
    def linear_shapes(self) -> tuple[LinearShape, ...]:
        """Matmul weights of ONE decoder layer, in module order.

        Includes MoE experts as ``fused_parameter=True`` entries (count_per_layer = num_experts);
        the Mixtral router is a bare parameter in transformers 5 and is not listed.
        """
        h, hd, I = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        out: list[LinearShape] = []
        if self.fused_qkv:
            out.append(LinearShape("qkv_proj", h, q + 2 * kv, 1, self.attention_qkv_bias))
        else:
            out += [LinearShape("q_proj", h, q, 1, self.attention_qkv_bias),
                    LinearShape("k_proj", h, kv, 1, self.attention_qkv_bias),
                    LinearShape("v_proj", h, kv, 1, self.attention_qkv_bias)]
        out.append(LinearShape("o_proj", q, h, 1, self.attention_out_bias))
        if self.is_moe:
            E = self.num_experts
            out += [LinearShape("experts.gate_up_proj", h, 2 * I, E, False, fused_parameter=True),
                    LinearShape("experts.down_proj", I, h, E, False, fused_parameter=True)]
        elif self.fused_gate_up:
            out += [LinearShape("gate_up_proj", h, 2 * I, 1, self.mlp_bias),
                    LinearShape("down_proj", I, h, 1, self.mlp_bias)]
        else:
            out += [LinearShape("gate_proj", h, I, 1, self.mlp_bias),
                    LinearShape("up_proj", h, I, 1, self.mlp_bias),
                    LinearShape("down_proj", I, h, 1, self.mlp_bias)]
        return tuple(out)

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


_COUNT_FIELDS = ("embedding_params", "lm_head_params", "per_layer_params",
                 "per_layer_linear_params", "final_norm_params", "num_params",
                 "per_layer_expert_params")


def _check_positive(key: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{key} must be a positive integer, got {v!r}")


def _counts(d: Mapping[str, Any]) -> dict[str, int]:
    """All count fields from dims + layout flags (dict of ModelSpec field values)."""
    h, L, V = d["hidden_size"], d["num_layers"], d["vocab_size"]
    hd = d["head_dim"]
    q, kv = d["num_heads"] * hd, d["num_kv_heads"] * hd
    I = d["intermediate_size"]
    E = d.get("num_experts", 1)
    qkv_b = d.get("attention_qkv_bias", False)
    o_b = d.get("attention_out_bias", False)
    mlp_b = d.get("mlp_bias", False)
    # attention: weights and biases (fused or not, same element count)
    linear = h * (q + 2 * kv) + q * h
    biases = (q + 2 * kv) * qkv_b + h * o_b
    expert = 0
    router = 0
    if E > 1:
        expert = E * (h * 2 * I + I * h)       # gate_up_proj (E,2I,h) + down_proj (E,h,I)
        router = E * h                         # MixtralTopKRouter.weight (E,h)
    else:
        linear += 3 * h * I                    # gate+up (or gate_up) and down
        biases += (2 * I + h) * mlp_b
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


# ============================================================================ from config.json
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "vocab_size")


def _int_key(cfg: Mapping[str, Any], key: str, where: str) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v <= 0:
        raise ValueError(f"{where}: key {key!r} must be a positive integer, got {v!r}")
    return int(v)


def model_spec_from_hf_config(cfg: Mapping[str, Any], name: str = "custom", *,
                              source: str | None = None) -> ModelSpec:
    """ModelSpec from a parsed HF ``config.json`` dict.

    ``source`` (a file path) only improves error messages; it defaults to ``name``.
    Raises ValueError naming the missing/bad key and the file.
    """
    where = f"model config {source or name!r}"
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"{where}: missing required key 'model_type'")
    for key in _REQUIRED:
        if cfg.get(key) is None:
            raise ValueError(f"{where}: missing required key {key!r} (model_type={model_type!r})")
    h = _int_key(cfg, "hidden_size", where)
    L = _int_key(cfg, "num_hidden_layers", where)
    nh = _int_key(cfg, "num_attention_heads", where)
    I = _int_key(cfg, "intermediate_size", where)
    V = _int_key(cfg, "vocab_size", where)
    nkv = _int_key(cfg, "num_key_value_heads", where) if cfg.get("num_key_value_heads") else nh
    hd = _int_key(cfg, "head_dim", where) if cfg.get("head_dim") else h // nh
    if nh % nkv:
        raise ValueError(f"{where}: num_key_value_heads={nkv} does not divide "
                         f"num_attention_heads={nh}")
    tie = bool(cfg.get("tie_word_embeddings", _TIE_DEFAULT.get(model_type, False)))
    mpe = cfg.get("max_position_embeddings")
    mpe = int(mpe) if isinstance(mpe, (int, float)) and not isinstance(mpe, bool) else None
    notes: list[str] = []
    layout: dict[str, Any] = {}
    attn_bias = bool(cfg.get("attention_bias", False))
    if model_type in ("llama", "gemma2"):
        layout.update(attention_qkv_bias=attn_bias, attention_out_bias=attn_bias)
        if model_type == "llama":
            layout["mlp_bias"] = bool(cfg.get("mlp_bias", False))
        else:
            layout["norms_per_layer"] = 4
    elif model_type == "qwen2":
        layout.update(attention_qkv_bias=True, attention_out_bias=False)
    elif model_type == "phi3":
        layout.update(fused_qkv=True, fused_gate_up=True)
    elif model_type == "mixtral":
        for key in ("num_local_experts", "num_experts_per_tok"):
            if cfg.get(key) is None:
                raise ValueError(f"{where}: missing required key {key!r} (model_type='mixtral')")
        layout.update(num_experts=_int_key(cfg, "num_local_experts", where),
                      experts_per_token=_int_key(cfg, "num_experts_per_tok", where))
    elif model_type == "mistral":
        pass
    else:
        moe_keys = [k for k in ("num_local_experts", "num_experts", "n_routed_experts",
                                "moe_intermediate_size") if cfg.get(k)]
        if moe_keys:
            raise ValueError(f"{where}: model_type {model_type!r} is a mixture-of-experts layout "
                             f"({', '.join(moe_keys)}) that shardtrain cannot count exactly; "
                             f"supported: {', '.join(sorted(KNOWN_MODEL_TYPES))}, or use --params")
        layout.update(attention_qkv_bias=attn_bias, attention_out_bias=attn_bias,
                      mlp_bias=bool(cfg.get("mlp_bias", False)))
        notes.append(f"model_type {model_type!r} is not one of {sorted(KNOWN_MODEL_TYPES)}; "
                     "parameter counts assume the Llama layout")
        if "tie_word_embeddings" not in cfg:
            notes.append("tie_word_embeddings absent; assumed False")
    if model_type in KNOWN_MODEL_TYPES:
        layer_cls = KNOWN_MODEL_TYPES[model_type]
    else:
        arch = (cfg.get("architectures") or [""])[0]
        stem = arch.split("For")[0] if "For" in arch else ""
        layer_cls = f"{stem}DecoderLayer" if stem else "LlamaDecoderLayer"
        notes.append(f"decoder layer class guessed as {layer_cls!r}")
    return ModelSpec.build(name=name, model_type=model_type, hidden_size=h, num_layers=L,
                           num_heads=nh, num_kv_heads=nkv, head_dim=hd, intermediate_size=I,
                           vocab_size=V, tie_word_embeddings=tie, decoder_layer_class=layer_cls,
                           max_position_embeddings=mpe, notes=tuple(notes), **layout)


# ============================================================================ from --params
#: Llama-family reference shapes (hidden, layers, heads, kv_heads, intermediate) used to infer
#: missing dims; a width in this table takes its heads / kv heads / MLP width from the table.
_FAMILY: tuple[tuple[int, int, int, int, int], ...] = (
    (128, 2, 4, 2, 256),              # tiny-llama test shape
    (256, 4, 4, 4, 768),              # toy
    (512, 8, 8, 8, 1536),             # ~40M class
    (768, 12, 12, 12, 2048),          # ~125M class (GPT-2 small width)
    (1024, 24, 16, 16, 2816),         # ~350M class
    (2048, 16, 32, 8, 8192),          # Llama-3.2-1B
    (2560, 32, 20, 20, 6912),         # ~3B class
    (3072, 28, 24, 8, 8192),          # Llama-3.2-3B
    (4096, 32, 32, 32, 11008),        # Llama-2-7B
    (5120, 40, 40, 40, 13824),        # Llama-2-13B
    (6656, 60, 52, 52, 17920),        # LLaMA-33B
    (8192, 80, 64, 8, 28672),         # Llama-2/3-70B
    (12288, 96, 96, 8, 32768),        # ~175B class
    (16384, 126, 128, 8, 53248),      # Llama-3.1-405B
)
_FAMILY_BY_WIDTH = {f[0]: f for f in _FAMILY}
_DEFAULT_VOCAB = 32000
_COMMON_HEAD_DIMS = (32, 64, 80, 96, 128, 160, 192, 256)
_TOLERANCE = 0.02        # inferred shapes land within 2% of the requested count
_EXPLICIT_TOLERANCE = 0.10  # fully specified dims may disagree with a nominal "7B" by up to 10%


def _llama_intermediate(h: int) -> int:
    """Llama's MLP width: 2/3 of 4h, rounded UP to a multiple of 256 (4096 -> 11008)."""
    if h in _FAMILY_BY_WIDTH:
        return _FAMILY_BY_WIDTH[h][4]
    return 256 * math.ceil(8 * h / 3 / 256)


def _default_heads(h: int) -> int:
    """Table heads for table widths; else head_dim = the divisor of h nearest 128 (64 if h<2048)."""
    if h in _FAMILY_BY_WIDTH:
        return _FAMILY_BY_WIDTH[h][2]
    target = 128 if h >= 2048 else 64
    divisors = [d for d in range(8, min(h, 256) + 1) if h % d == 0]
    if not divisors:
        return 1
    return h // min(divisors, key=lambda d: (abs(math.log2(d / target)), -d))


def _default_kv(h: int, heads: int) -> int:
    fam = _FAMILY_BY_WIDTH.get(h)
    if fam is not None and fam[2] == heads:
        return fam[3]
    return 8 if h >= 8192 and heads % 8 == 0 else heads


def _total(h: int, L: int, heads: int, kv: int, I: int, V: int) -> int:
    hd = h // heads
    per_layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * I + 2 * h
    return 2 * V * h + L * per_layer + h


def model_spec_from_params(num_params: float, *, hidden_size: int | None = None,
                           num_layers: int | None = None, num_heads: int | None = None,
                           num_kv_heads: int | None = None, vocab_size: int | None = None,
                           intermediate_size: int | None = None, name: str = "custom"
                           ) -> ModelSpec:
    """A Llama-layout ModelSpec with about ``num_params`` parameters (``--params 7.5e9``).

    Given dims are honoured; missing ones are inferred:

    * ``vocab_size``: 32000 (Llama-2 tokenizer) unless given; embeddings untied (lm_head separate).
    * ``hidden_size``: if ``num_layers`` is given, the width (multiple of 128, or num_heads times
      a common head_dim 32...256) whose total is closest to N; otherwise the width of the
      Llama-family reference shape (``_FAMILY``: toy ... 405B) whose nominal size (at the
      table's depth) is closest to N in log-space, restricted to ``num_heads * head_dim``
      (common head dims) when ``num_heads`` is given; never a width whose embeddings alone
      exceed 90% of N when a narrower one exists.
    * For a width that is in the reference table, heads / kv heads / MLP width come from the
      table (e.g. 8192 -> 64 heads, 8 kv heads, 28672 as Llama-70B). For any other width:
    * ``num_heads``: hidden / head_dim, head_dim the divisor of hidden nearest 128 (64 below
      width 2048), e.g. 5000 -> 40 heads of 125.
    * ``num_kv_heads``: 8 (GQA, as Llama-70B/405B) for hidden >= 8192, else == num_heads (MHA).
    * ``intermediate_size``: 8/3 * hidden rounded up to a multiple of 256 (Llama rule).
    * ``num_layers``: (N - embeddings - lm_head - final norm) / per-layer params, rounded.

    If rounding the layer count (or a given width/depth) leaves the total more than 2% from N and
    ``intermediate_size`` was not given, the MLP width is re-solved (multiple of 256, 64, or 8) to
    land within 2%. With hidden, layers and intermediate all given, the total must be within 10%
    of N (a nominal "7B" is often 6.7B).

    Raises ValueError naming the offending argument when the dims are inconsistent (heads not
    dividing hidden, kv heads not dividing heads, embeddings alone exceeding N, ...).
    """
    if isinstance(num_params, bool) or not isinstance(num_params, (int, float)) \
            or not math.isfinite(num_params) or num_params <= 0:
        raise ValueError(f"num_params must be a positive number, got {num_params!r}")
    N = float(num_params)
    for key, v in (("hidden_size", hidden_size), ("num_layers", num_layers),
                   ("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                   ("vocab_size", vocab_size), ("intermediate_size", intermediate_size)):
        if v is not None:
            _check_positive(key, v)
    V = vocab_size or _DEFAULT_VOCAB
    if hidden_size is not None and num_heads is not None and hidden_size % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide hidden_size={hidden_size}")
    if num_heads is not None and num_kv_heads is not None and num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}")
    if num_kv_heads is not None and num_heads is None and hidden_size is not None:
        if _default_heads(hidden_size) % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} does not divide the inferred "
                             f"num_heads={_default_heads(hidden_size)}; give num_heads too")

    def dims_for(h: int) -> tuple[int, int, int]:
        heads = num_heads or _default_heads(h)
        kv = num_kv_heads or _default_kv(h, heads)
        I = intermediate_size or _llama_intermediate(h)
        return heads, kv, I

    def fixed(h: int) -> int:  # embeddings + lm_head + final norm
        return 2 * V * h + h

    # ---- width
    if hidden_size is not None:
        h = hidden_size
    else:
        if num_heads is not None:
            cands = [num_heads * hd for hd in _COMMON_HEAD_DIMS]
        elif num_layers is not None:
            cands = list(range(128, 65536 + 1, 128))
        else:
            cands = [f[0] for f in _FAMILY]
        # never pick a width whose embeddings alone eat the budget when a narrower one exists
        roomy = [c for c in cands if 2 * V * c + c < 0.9 * N]
        cands = roomy or cands[:1]
        if num_kv_heads is not None:
            cands = [c for c in cands if (num_heads or _default_heads(c)) % num_kv_heads == 0]
            if not cands:
                raise ValueError(f"num_kv_heads={num_kv_heads}: no Llama-like width has a head "
                                 "count it divides; give num_heads and hidden_size")
        if num_layers is not None:
            def err(c: int) -> float:
                heads, kv, I = dims_for(c)
                return abs(_total(c, num_layers, heads, kv, I, V) - N)
            h = min(cands, key=lambda c: (err(c), c % 128 != 0))
        else:
            def nominal(c: int) -> float:
                ref = min(_FAMILY, key=lambda f: abs(f[0] - c))
                heads, kv, I = dims_for(c)
                return _total(c, ref[1], heads, kv, I, V)
            h = min(cands, key=lambda c: abs(math.log(nominal(c) / N)))
    heads, kv, I = dims_for(h)
    if fixed(h) >= N:
        bad = "hidden_size" if hidden_size is not None else "vocab_size" if vocab_size else \
            "num_params"
        raise ValueError(f"{bad}: embeddings + lm_head alone ({fixed(h):.3g} params with "
                         f"hidden_size={h}, vocab_size={V}) reach num_params={N:.3g}; "
                         "use a smaller width/vocabulary or a larger num_params")
    attn_norm = 2 * h * heads * (h // heads) + 2 * h * kv * (h // heads) + 2 * h

    # ---- depth
    if num_layers is not None:
        L = num_layers
    else:
        L = max(1, round((N - fixed(h)) / (attn_norm + 3 * h * I)))

    def total(I_: int) -> int:
        return _total(h, L, heads, kv, I_, V)

    # ---- re-solve the MLP width if rounding left us off target
    if abs(total(I) - N) > _TOLERANCE * N:
        if intermediate_size is None:
            exact = ((N - fixed(h)) / L - attn_norm) / (3 * h)
            if exact < 1:
                bad = "num_layers" if num_layers is not None else "hidden_size"
                raise ValueError(f"{bad}: with hidden_size={h} and num_layers={L} the attention "
                                 f"blocks alone exceed num_params={N:.3g}")
            for mult in (256, 64, 8, 1):
                I = max(mult, mult * round(exact / mult))
                if abs(total(I) - N) <= _TOLERANCE * N:
                    break
        tol = _EXPLICIT_TOLERANCE if (hidden_size and num_layers and intermediate_size) \
            else _TOLERANCE
        if abs(total(I) - N) > tol * N:
            given = {k: v for k, v in (("hidden_size", hidden_size), ("num_layers", num_layers),
                                       ("intermediate_size", intermediate_size),
                                       ("vocab_size", vocab_size)) if v is not None}
            bad = ", ".join(f"{k}={v}" for k, v in given.items()) or "num_params"
            raise ValueError(f"num_params={N:.4g} is inconsistent with {bad}: the closest "
                             f"Llama-like model has {total(I):.4g} params")
    return ModelSpec.build(name=name, model_type="llama", hidden_size=h, num_layers=L,
                           num_heads=heads, num_kv_heads=kv, head_dim=h // heads,
                           intermediate_size=I, vocab_size=V, tie_word_embeddings=False,
                           decoder_layer_class="LlamaDecoderLayer",
                           notes=(f"inferred from num_params={N:.4g} (Llama-like shape)",))
