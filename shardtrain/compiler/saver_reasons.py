"""The `why` lines of the long-context savers (tiled MLP, checkpoint offload: compiler/savers.py); called by
plan_reasons.py. Pure."""
from __future__ import annotations

from shardtrain.compiler.activations import checkpointed_layer_count, tokens_per_rank
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.plan import Candidate
from shardtrain.compiler.savers import (auto_tiles, ckpt_input_bytes, tile_working_bytes,
                                        tiled_saved_reduction_per_token)
from shardtrain.compiler.specs import ActivationOffload, CkptOffload, TrainSpec
from shardtrain.units import fmt_bytes


def long_context_reasons(model: ModelSpec, t: TrainSpec, c: Candidate) -> list[str]:
    """Why the MLP is (not) tiled and the checkpointed inputs are (not) on the host."""
    r = []
    tokens = tokens_per_rank(c.micro_batch_size, t.seq_len, c.mesh)
    n = c.tiled_mlp_tiles
    if n > 1:
        untiled = tiled_saved_reduction_per_token(model, c.precision, c.mesh) * tokens
        tile = tile_working_bytes(model, c.precision, tokens, n, c.mesh)
        if t.tiled_mlp is None:
            local = -(-t.seq_len // c.mesh.cp)
            how = (f"auto, ceil({local:,} tokens / hidden {model.hidden_size}) as DeepSpeed's TiledMLP"
                   if n == auto_tiles(model, t.seq_len, c.mesh) and local > model.hidden_size else "auto")
            why = "no faster plan fits untiled"
        else:
            how, why = "train.tiled_mlp", "as set"
        r.append(f"tiled MLP {n} tiles ({how}): the untiled MLP intermediates ({fmt_bytes(untiled)} per layer) "
                 f"exist for {-(-tokens // n):,} tokens at a time ({fmt_bytes(tile)} with x_grad in a layer's "
                 f"backward); {why}; costs one more MLP forward per step")
    n_ck = checkpointed_layer_count(c.gradient_checkpointing, model.num_layers, t.selective_every)
    if c.ckpt_offload:
        per_rank = n_ck * ckpt_input_bytes(model, c.precision, tokens, c.mesh)
        how = "ckpt_offload auto → cpu" if t.ckpt_offload is CkptOffload.AUTO else "train.ckpt_offload cpu"
        why = "no faster plan fits with them on the GPU" if t.ckpt_offload is CkptOffload.AUTO else "as set"
        r.append(f"checkpointed layer inputs in host RAM ({how}): {n_ck} layers, {fmt_bytes(per_rank)} per GPU moved "
                 f"out and back over PCIe every micro-step (host RAM per node in all: "
                 f"{fmt_bytes(c.cpu_memory_per_node_bytes)}); {why}")
    elif t.ckpt_offload is CkptOffload.CPU:
        what = ("activation offload moves them already" if c.activation_offload is ActivationOffload.CPU
                or t.activation_offload is ActivationOffload.CPU else "this plan checkpoints no layer")
        r.append(f"train.ckpt_offload cpu has no effect: {what}")
    return r


#: The parts of the activations term `plan --max` names when activations stop the value (maxfit.py).
PART_WORDS = {"ckpt_inputs": "checkpointed layer inputs", "saved_layers": "saved activations of non-checkpointed layers",
              "layer_recompute": "one layer's recompute (attention and norms)",
              "mlp_intermediates": "one layer's MLP intermediates"}


def activation_parts(model: ModelSpec, t: TrainSpec, c: Candidate) -> dict[str, int]:
    """The activations term of candidate ``c`` split into the parts the savers act on (bytes on one GPU, from
    the same formulas as phases.py, the engine constants left out): checkpointed layer inputs (all of them, or
    two with checkpoint offload), the saved activations of the non-checkpointed layers, one layer's recompute
    without its MLP, and one layer's MLP intermediates (untiled: saved; tiled: one tile + x_grad). Activation
    offload: the first two are on the host (0)."""
    from shardtrain.compiler.activations import hidden_per_rank, layer_bytes_per_token, mlp_backward_extra_per_token
    tokens = tokens_per_rank(c.micro_batch_size, t.seq_len, c.mesh)
    L = model.num_layers
    n_ck = checkpointed_layer_count(c.gradient_checkpointing, L, t.selective_every)
    mlp = tiled_saved_reduction_per_token(model, c.precision, c.mesh)
    per_tok = layer_bytes_per_token(model, c.precision, t.attention, t.seq_len, parallel=c.mesh)
    tiled = c.tiled_mlp_tiles > 1
    per_layer = (per_tok - (mlp if tiled else 0)) * tokens
    resid = c.precision.param_bytes * hidden_per_rank(model, c.mesh) * tokens
    on_host = c.activation_offload is ActivationOffload.CPU
    return {
        "ckpt_inputs": 0 if on_host else (min(n_ck, 2) if c.ckpt_offload else n_ck) * resid,
        "saved_layers": 0 if on_host else (L - n_ck) * per_layer,
        "layer_recompute": (per_tok - mlp) * tokens if n_ck else 0,
        # untiled: the saved intermediates and, at their backward, the MLP's gradients beside them (phases.py)
        "mlp_intermediates": (tile_working_bytes(model, c.precision, tokens, c.tiled_mlp_tiles, c.mesh) if tiled
                              else (mlp + mlp_backward_extra_per_token(model, c.precision, c.mesh)) * tokens),
    }
