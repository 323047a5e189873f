"""--params -> ModelSpec: solve a Llama-like shape (hidden, layers, heads, MLP width) for a
parameter count, honouring whatever dims the user gave (``shardtrain plan --params 7.5e9 --layers 40``).

Every total here is ``param_counts`` of compiler/model.py (the one parameter count): the search
only chooses dims.
"""
from __future__ import annotations

import math

from shardtrain.compiler.model import ModelSpec, check_positive_int, param_counts

__all__ = ["model_spec_from_params"]

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


def _llama_counts(h: int, L: int, heads: int, kv: int, I: int, V: int) -> dict[str, int]:
    """param_counts of the plain Llama layout (untied, no biases) the inference builds."""
    return param_counts(dict(hidden_size=h, num_layers=L, num_heads=heads, num_kv_heads=kv,
                             head_dim=h // heads, intermediate_size=I, vocab_size=V,
                             tie_word_embeddings=False))


def _total(h: int, L: int, heads: int, kv: int, I: int, V: int) -> int:
    return _llama_counts(h, L, heads, kv, I, V)["num_params"]


def model_spec_from_params(num_params: float, *, hidden_size: int | None = None,
                           num_layers: int | None = None, num_heads: int | None = None,
                           num_kv_heads: int | None = None, vocab_size: int | None = None,
                           intermediate_size: int | None = None
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
            check_positive_int(key, v)
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

    def fixed(h: int) -> int:  # embeddings + lm_head + final norm: a model of 0 layers
        heads, kv, I = dims_for(h)
        return _total(h, 0, heads, kv, I, V)

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
        roomy = [c for c in cands if fixed(c) < 0.9 * N]
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
    # one layer = attention + norms (a layer without MLP) + mlp_per_I * intermediate_size
    attn_norm = _llama_counts(h, 1, heads, kv, 0, V)["per_layer_params"]
    mlp_per_I = _llama_counts(h, 1, heads, kv, 1, V)["per_layer_params"] - attn_norm

    # ---- depth
    if num_layers is not None:
        L = num_layers
    else:
        L = max(1, round((N - fixed(h)) / (attn_norm + mlp_per_I * I)))

    def total(I_: int) -> int:
        return _total(h, L, heads, kv, I_, V)

    # ---- re-solve the MLP width if rounding left us off target
    if abs(total(I) - N) > _TOLERANCE * N:
        if intermediate_size is None:
            exact = ((N - fixed(h)) / L - attn_norm) / mlp_per_I
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
    return ModelSpec.build(name="custom", model_type="llama", hidden_size=h, num_layers=L,
                           num_heads=heads, num_kv_heads=kv, head_dim=h // heads,
                           intermediate_size=I, vocab_size=V, tie_word_embeddings=False,
                           decoder_layer_class="LlamaDecoderLayer",
                           notes=(f"inferred from num_params={N:.4g} (Llama-like shape)",))
