"""Phase-aware peak memory per GPU: the live bytes of every term at the moments that decide the peak.

The old per-GPU total summed each term's maximum as if all coexisted. They do not (issue 8):
- "forward": end of the forward incl. the loss / logits path. No gradients yet in FSDP2 / DeepSpeed
  steady state (runtime.engines BaseEngine.step: `zero_grad(set_to_none=True)`), except previous
  micro-steps' gradients when accumulating (FSDP2 sharded grads, or unsharded fp32 grads with
  `set_requires_gradient_sync(False)`). DDP keeps its gradients always: with
  gradient_as_bucket_view=True they are views into the reducer's buckets
  (torch/csrc/distributed/c10d/reducer.cpp initialize_bucket_views) and the runtime zeroes them with
  set_to_none=False (runtime.engines.DDPEngine.grads_set_to_none).
- "backward": the worst of several instants: the loss backward (all activations still saved, the
  fp32 log_softmax output + nll gradient + its gradient); the root's re-gather once the logits'
  gradient exists; the second decoder layer from the top (activations minus one layer, one layer's
  backward working set, the root's unsharded lm_head gradient, which FSDP2 reduce-scatters only in
  the root's post-backward: _fully_shard/_fsdp_param_group.py post_backward); a late layer (sharded
  grads nearly complete, a unit's unsharded grads + fp32 reduce-scatter input); the embedding
  backward (tied: lm_head grad + embedding grad + their sum) and the root's own reduce-scatter.
- "optimizer": optimizer.step(): full (sharded) gradients, states, the optimizer's temporaries and
  DeepSpeed's step-time fp32 gradient partition (stage_1_and_2.py step:
  `flatten(averaged_gradients).to(fp32)`; stage3.py `fp32_partitioned_groups_flat[i].grad`);
  activations are freed.
DeepSpeed ZeRO (checked against the real engine with the real MemTracker, tests/runtime/test_peak_truth.py):
stage 1/2 frees its gradient partition at the end of every backward, so none exists in the forward or
at the loss backward; stage 3 keeps gathered params within stage3_max_reuse_distance from the forward
to their backward (compiler/gathered.py); the step's torch AdamW runs over the flat fp32 partition.
FSDP2 unsharded parameters (_fully_shard/_fsdp_param_group.py unshard/reshard,
_fsdp_collectives.py foreach_all_gather): the root unit (embedding, final norm, lm_head) is gathered
in its pre-forward and kept until its post-forward (reshard_after_forward=True, runtime.engines
FSDP2Engine passes it to the root too) and again from its pre-backward to the end of backward; a
decoder unit's all-gather output coexists with the copied-out unsharded parameters
(foreach_all_gather_copy_out) while the next unit is prefetched, so two units are in flight in the
backward; the reduce-scatter input is the unit's unsharded gradients in reduce_dtype (fp32).
SHARD_GRAD_OP (reshard_after_forward=False) keeps every unit gathered from forward to backward.
Gathered sizes use dim 0 padded to a multiple of the shard group (8 experts on 64 ranks gather 8x).
DDP full fine-tuning under autocast (runtime.engines.DDPEngine) keeps an fp32 residual stream and the
autocast cache's 16-bit weight copies (aten/src/ATen/autocast_mode.cpp cached_cast).
Each instant is one dict of terms; a phase's breakdown is its worst instant, so terms sum to totals.
Constants marked "measured" were fitted to `shardtrain plan --trace` (torch 2.13 FSDPMemTracker /
MemTracker under FakeTensorMode, transformers 5.23) and are re-checked by benchmarks/calibrate_memory.py
and tests/test_trace.py.
"""
from __future__ import annotations

from shardtrain.compiler.activations import (checkpointed_layer_count, head_bytes_per_token, hidden_per_rank,
                                             layer_bytes_per_token, logits_bytes, mlp_backward_extra_per_token,
                                             tokens_per_rank)
from shardtrain.compiler.gathered import ROOT_GROUPS, gathered_bytes, per_layer_count, zero3_gathered
from shardtrain.compiler.inventory import TensorGroup, trainable_params
from shardtrain.compiler.memory import ModelStateBytes, fsdp_shard_groups
from shardtrain.compiler.memo import by_identity
from shardtrain.compiler.mesh_memory import cp_transient_bytes, tp_gather_transient_bytes, tp_local_groups
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.op_ckpt import lora_adapted, saved_bytes_per_token
from shardtrain.compiler.runner import RunnerPath
from shardtrain.compiler.phase_inputs import PhaseInputs
from shardtrain.compiler.savers import tile_working_bytes
from shardtrain.compiler.plan import MemoryBreakdown
from shardtrain.compiler.specs import (Attention, Engine, GradCkpt, LossMode, Method, OffloadDevice, Optimizer,
                                       ParallelDims, Precision, Strategy)

PHASES = ("forward", "backward", "optimizer")

AUTOCAST_FP32_RESIDUAL_BYTES_PER_H = 12
"""DDP full fine-tuning runs fp32 params under autocast: the embedding output, residual adds and
RMSNorm inputs stay fp32 (autocast casts only matmul inputs), +12·h bytes per token per layer over
the all-16-bit block (measured: 8B, exactly 49 288 B/token/layer = 12·4096 + 136)."""
LORA_SAVED_BYTES_PER_INPUT = {Engine.DDP: 4.36, Engine.FSDP: 2.33, Engine.DEEPSPEED: 2.33}
"""peft LoRA per adapted Linear and token, per input feature: lora_dropout's mask and output (saved
by lora_A), peft's cast of x to the adapter dtype (fp32 adapters under DDP autocast), minus the base
inputs a frozen weight no longer needs saved (measured on 8B, r=16, all 7 projections)."""
LORA_FP32_EXTRA_BYTES_PER_INPUT = 2
"""fp32 training under FSDP2 / DeepSpeed (no autocast): peft's lora_dropout output, saved by lora_A, is
4 bytes per element instead of the 2 the bf16 constant above was measured with (+2 per input feature;
measured fit on the fp32 peak truth, tests/runtime/test_peak_truth.py FSDP2 LoRA world 2: +1.7, so
this is conservative by ~0.5% there; without it that point was 2.7% under the real MemTracker)."""
FSDP_EXTRA_BYTES_PER_H = 3
"""All-16-bit block (FSDP2 / DeepSpeed): the block saves ~3·h bytes/token more than the derivation in
activations.py (measured: 8B, 221.3 kB vs 208.9 kB per token per layer)."""
BACKWARD_HIDDEN_GRADS = 1
"""Hidden-width gradients live at a layer's MLP backward beside the MLP's own (activations.py
mlp_backward_extra_per_token): the layer output's incoming gradient, which the residual add passes on
unchanged to both branches (derivatives.yaml `add`: self: grad, other: grad). (Was
BACKWARD_WORKING_BYTES_PER_H = 8 bytes·h, fitted in bf16, which did not scale with the element size and
missed the MLP's gradients: 1,320 B/token under at fp32, tests/runtime/test_long_seq_truth.py.)"""
RMSNORM_BACKWARD_FP32_TEMPS = 3
"""fp32 h-wide tensors live at once in an RMSNorm's backward (transformers 5.23 LlamaRMSNorm: x32 = x.float(),
y = x32 * rsqrt(mean(x32²) + eps), out = w * y.to(dtype); derivatives.yaml `mul`): the upcast output gradient,
`grad * rsqrt` and the `grad * x32` product reduced for rsqrt's gradient; then pow's gradient and the sum of
x32's two gradients, again three. Matters only where the MLP's backward holds less (a finely tiled MLP)."""


def residual_elem_bytes(engine: Engine, precision: Precision, method: Method) -> int:
    """Element size of the residual stream (layer inputs, what checkpoint offload moves): fp32 under DDP
    full fine-tuning's autocast (AUTOCAST_FP32_RESIDUAL_BYTES_PER_H), else the 16-bit (or fp32) compute size."""
    return 4 if engine is Engine.DDP and precision.autocast and method is Method.FULL else precision.param_bytes


@by_identity
def _sum_in_features(model: ModelSpec, targets_trainable: tuple[TensorGroup, ...]) -> int:
    """Σ in_features of the LoRA-adapted linears of one layer (lora_A is (r, in))."""
    L = model.num_layers
    return sum(g.shape[-1] * g.count // L for g in targets_trainable
               if g.name.endswith(".lora_A") and g.count % L == 0)


@by_identity
def _layer_trainable(groups: tuple[TensorGroup, ...], model: ModelSpec) -> int:
    L = model.num_layers
    return sum(g.total // L for g in groups if g.trainable and g.count % L == 0 and g.count >= L)


@by_identity
def _largest_trainable(groups: tuple[TensorGroup, ...], shard: int) -> int:
    from math import ceil
    return max((ceil(g.shape[0] / shard) * (g.numel // g.shape[0]) for g in groups if g.trainable), default=0)


@by_identity
def _fsdp_units(groups: tuple[TensorGroup, ...], N: int, method: Method, precision: Precision,
                L: int) -> tuple[int, int, int, int, int]:
    """(trainable elements of a rank's shard, one unit's gathered bytes and trainable elements, the root's)
    — per inventory and shard size, not per candidate (memo.by_identity)."""
    unit, layer_tr = gathered_bytes(groups, N, method, precision, lambda g: per_layer_count(g, L))
    root, root_tr = gathered_bytes(groups, N, method, precision, lambda g: ROOT_GROUPS.get(g.name, 0) * g.count)
    return trainable_params(fsdp_shard_groups(groups, N)), unit, layer_tr, root, root_tr


def phase_terms(x: PhaseInputs, ms: ModelStateBytes) -> dict[str, dict[str, int]]:
    """{phase: {term: bytes}} (without cuda_context) for one candidate."""
    m, s = x.model, x.strategy
    eng = s.engine
    p = x.precision.param_bytes
    L = m.num_layers
    # on a mesh: the rank's tokens (seq_len / cp each) and the width of what tp does not split
    h = hidden_per_rank(m, x.parallel)
    tokens = tokens_per_rank(x.micro_batch, x.seq_len, x.parallel)
    cp_fwd, cp_bwd = cp_transient_bytes(m, x.precision, tokens, x.parallel)
    tp_gather = tp_gather_transient_bytes(m, x.precision, tokens, x.parallel)
    T = trainable_params(x.groups)
    autocast = eng is Engine.DDP and x.precision.autocast
    full_ft = x.method is Method.FULL
    tb = x.precision.trainable_bytes   # DDP/FSDP2 trainable params and grads: fp32, pure bf16 2

    # ---- saved activations per layer (bytes per token)
    per_tok = x.layer_act_bytes_per_token
    if autocast and full_ft:
        per_tok += AUTOCAST_FP32_RESIDUAL_BYTES_PER_H * h
    elif p == 2:
        per_tok += FSDP_EXTRA_BYTES_PER_H * h
    if not full_ft:
        # pure bf16: bf16 adapters, no cast of x to an fp32 adapter dtype (as FSDP2 under its policy)
        lora_bytes = LORA_SAVED_BYTES_PER_INPUT[Engine.FSDP if x.precision is Precision.BF16_PURE else eng]
        if eng is not Engine.DDP and p == 4:
            lora_bytes += LORA_FP32_EXTRA_BYTES_PER_INPUT
        per_tok += lora_bytes * _sum_in_features(m, x.groups)
    per_layer = per_tok * tokens
    if autocast and full_ft:
        # autocast's cast cache keeps a 16-bit copy of every fp32 weight a layer's matmuls used
        # (aten/src/ATen/autocast_mode.cpp cached_cast), saved by the matmul for backward
        per_layer += p * _layer_trainable(x.groups, m)
    e_resid = residual_elem_bytes(eng, x.precision, x.method)   # the residual stream's element size
    resid = e_resid * h * tokens   # checkpointed layer keeps its input
    n_ck = x.grad_ckpt_layers
    # grad_ckpt op (compiler/op_ckpt.py): every layer also keeps its saved ops' outputs, in the SAC cache
    # (not through saved-tensor hooks, so they stay on the device under activation / checkpoint offload)
    op_kept = int(x.op_saved_bytes_per_token * tokens) * n_ck
    # checkpoint offload (compiler/savers.py): the inputs are on the host but one (in flight / recomputing)
    kept = (L - n_ck) * per_layer + (min(n_ck, 1) * resid if x.ckpt_offload else n_ck * resid)
    if x.activation_offload:
        kept = 0     # in host RAM (activations.activation_host_bytes)
    kept += op_kept
    # final norm's saved input + normalised tensor, its output, RoPE cos/sin (activations.py)
    head = head_bytes_per_token(m, e_resid, x.parallel) * tokens

    # ---- model states, and the instants of each phase
    params, master, states = ms.params, ms.master_params, ms.optimizer_states
    top = per_layer if n_ck == 0 else resid + op_kept // n_ck   # what the first layer's backward frees
    # the MLP backward's instant: its gradients beside its saved tensors (untiled; a tiled MLP: one tile's
    # intermediates + gradients and x_grad instead) and the incoming hidden gradient
    mlp_bwd = (mlp_backward_extra_per_token(m, x.precision, x.parallel) * tokens if x.tiled_mlp_tiles <= 1
               else tile_working_bytes(m, x.precision, tokens, x.tiled_mlp_tiles, x.parallel, e_resid))
    # ... or the RMSNorm backward's fp32 temporaries (the larger one: a finely tiled MLP's is small)
    norm_bwd = RMSNORM_BACKWARD_FP32_TEMPS * 4 * h * tokens
    working = (per_layer if n_ck else 0) + max(mlp_bwd, norm_bwd) + BACKWARD_HIDDEN_GRADS * resid + cp_bwd
    # the top layer's MLP backward: without checkpointing its saved tensors are all still there (only the
    # product is gone, inside mlp_bwd's count), so nothing is freed yet; with it, the recomputed layer's
    # input is in both `kept` and `per_layer`
    top_bwd = top if n_ck else 0
    # checkpoint offload: the next input prefetched
    working += resid if x.ckpt_offload and n_ck else 0
    # 16-bit logits at the lm_head matmul (+ tp-local slice); the chunked loss: one chunk's (measured:
    # tests/runtime/test_long_seq_truth.py, seq 16,384 x 32,000 fp32: forward peak 133 MB, not 2.2 GB)
    bsv_p = p * (x.head_tokens or tokens) * m.vocab_size + tp_gather
    if eng is Engine.FSDP:
        N = x.shard_size
        # every size below is what FSDP2 really moves: dim 0 padded to a multiple of N
        # (_fsdp_param.py _init_sharded_param; matters when dim 0 is small, e.g. 8 experts on 64 ranks)
        T_shard, unit, layer_tr, root, root_tr = _fsdp_units(x.groups, N, x.method, x.precision, L)
        emb_tr = m.embedding_params if any(g.trainable and g.name == "embed_tokens" for g in x.groups) else 0
        # the lm_head's gradient exists from the loss backward on (tied: it is the embedding's)
        lm_tr = sum(g.total for g in x.groups if g.trainable and g.name == "lm_head") + \
            (emb_tr if m.tie_word_embeddings else 0)
        g_prev = 0   # previous micro-steps' grads (sharded, or unsharded fp32 when the sync is deferred)
        # FSDP_OFFLOAD (CPUOffloadPolicy): the sharded grads go to the host after each reduce-scatter and
        # accumulate there (memory._fsdp_offload_bytes); only a deferred sync keeps grads on the device
        on_host = s is Strategy.FSDP_OFFLOAD
        if x.grad_accum > 1:
            g_prev = tb * T if x.defer_grad_sync else (0 if on_host else tb * T_shard)
        # SHARD_GRAD_OP (reshard_after_forward=False, root included) keeps every unit and the root
        # gathered from its forward until its own backward (reshard after backward)
        sgo = s is Strategy.FSDP_SHARD_GRAD_OP
        held = root + L * unit if sgo else 0
        # one rank: no all-gather, the unsharded params are initialised from the shards
        # (_fsdp_param_group.py unshard/wait_for_unshard `world_size == 1`); the reduce-scatter input
        # (foreach_reduce's chunk_cat into a reduce_dtype buffer) is allocated at every world size
        ag = 2 if N > 1 else 1
        rs = tb * layer_tr
        instants = {
            "forward": [
                # the root's all-gather before anything runs: its all-gather output and the
                # copied-out unsharded params coexist (_fsdp_collectives.py foreach_all_gather_copy_out)
                dict(grads=g_prev, activations=0, logits=0, buffers=ag * root),
                # a unit's all-gather near the end of the forward: its all-gather output + copied-out
                # params, the next unit's prefetched all-gather output (implicit forward prefetch),
                # the root gathered since the forward began
                dict(grads=g_prev, activations=max(kept - top, 0) + head + cp_fwd, logits=0,
                     buffers=max(root + (ag + 1) * unit, held + unit)),
                # lm_head matmul: root gathered + the last unit's all-gather output, 16-bit logits
                dict(grads=g_prev, activations=kept + head + bsv_p, logits=0, buffers=max(root + unit, held)),
                # loss: the root resharded after its forward (FULL/HYBRID), fp32 loss path
                dict(grads=g_prev, activations=kept + head, logits=x.logits_forward_bytes,
                     # HF runners: the loss is part of the root's forward, so the root is still gathered (and
                     # the last unit's all-gather output: traced)
                     buffers=max(held, root + unit) if x.loss_in_root else held)],
            "backward": [
                # loss backward: the root is re-gathered only when the logits' gradient exists (its
                # pre-backward hook sits on the forward outputs: _fsdp_state.py
                # _register_pre_backward_hook), after the fp32 loss-path tensors are gone
                dict(grads=g_prev, activations=kept + head, logits=x.logits_backward_bytes,
                     # HF runners: the root's pre-backward hook sits on the loss: it is re-gathered before the
                     # fp32 loss backward, next to the last unit's prefetched all-gather (compiler/runner.py;
                     # traced: FSDPMemTracker "Unsharded Param" = root, "All Gather" = one unit); the chunked
                     # loss: each chunk's recompute + backward runs lm_head, a root parameter, so the root is
                     # gathered through the loss backward (traced, tests/test_trace_savers.py: FSDP2 chunked
                     # backward analytic/traced 0.959 without it, 1.004 with it)
                     buffers=max(held, root + unit) if x.loss_in_root or x.head_tokens is not None else held),
                # ... then the root's re-gather next to the logits' gradient
                dict(grads=g_prev, activations=kept + head + bsv_p, logits=0, buffers=held or ag * root),
                # second layer from the top: root + current + prefetched unit, the previous unit's
                # fp32 reduce-scatter input and sharded grads, the root's unsharded 16-bit grads
                # (reduce-scattered in the root's post-backward, at the very end)
                dict(grads=g_prev + p * lm_tr + tb * -(-layer_tr // N),
                     activations=max(kept - top_bwd, 0) + head + working, logits=0,
                     buffers=max(root + 2 * unit, held) + rs)],
        }
        # end of backward (embedding backward): every layer's sharded grads, the root still gathered
        # with its unsharded 16-bit grads (tied embeddings: lm_head grad + embedding grad + their sum,
        # AccumulateGrad), the last unit's fp32 reduce-scatter input; activations all freed
        tied_extra = 2 * p * emb_tr if m.tie_word_embeddings else 0
        layers_sharded = 0 if on_host else tb * (T_shard - -(-root_tr // N))
        # a late layer's backward (activations nearly freed, sharded grads nearly complete): its
        # unsharded 16-bit grads, the previous unit's fp32 reduce-scatter input, current + prefetched unit
        instants["backward"].append(dict(grads=g_prev + layers_sharded + p * lm_tr + p * layer_tr, activations=0,
                                         logits=0, buffers=max(root + 2 * unit, held) + rs))
        instants["backward"].append(dict(grads=g_prev + layers_sharded + p * root_tr + tied_extra,
                                         activations=0, logits=0, buffers=root + rs))
        # ... then the root's own reduce-scatter (post_backward reshards first): its fp32 input
        # next to its unsharded grads
        instants["backward"].append(dict(grads=g_prev + layers_sharded + p * root_tr, activations=0, logits=0,
                                         buffers=tb * root_tr))
        # ... and once copied in (_fsdp_collectives.py foreach_reduce: `unsharded_grads.clear()`, then
        # `reduce_output = reduce_scatter_comm.allocate(input_numel // world_size)`): input + output, with
        # the gradient autograd produced last (the embedding's) still referenced by its hook. At one rank
        # the output is as large as the input (measured: real FSDPMemTracker, fp32, world 1: Temp = 2 x
        # 4·root, Unsharded Grad = the embedding's; was 6.4% under without it)
        root_last = p * max((g.numel for g in x.groups if g.trainable and g.name in ROOT_GROUPS), default=0)
        instants["backward"].append(dict(grads=g_prev + layers_sharded + root_last + tied_extra, activations=0,
                                         logits=0, buffers=tb * root_tr + tb * -(-root_tr // N)))
        instants.update({
            # the last micro-step syncs: deferred unsharded grads are reduce-scattered and freed
            "optimizer": [dict(grads=0 if on_host else tb * T_shard, activations=0, logits=0, buffers=0)],
        })
        local_T = T_shard
    else:
        if eng is Engine.DDP:
            g = {ph: ms.grads for ph in PHASES}
            local_T = T
        else:
            # DeepSpeed: ms.grads = persistent 16-bit partition + max(step fp32 partition, in-flight
            # backward gradients) (memory.py). The fp32 partition exists only inside step(); in the
            # forward neither it nor the in-flight gradients exist (backward keeps the max: conservative).
            local_T = -(-T // x.shard_size)
            step_fp32 = 4 * local_T if s.offload_optimizer is OffloadDevice.NONE else 0
            g = {"forward": max(ms.grads - step_fp32, p * local_T if step_fp32 else 0),
                 "backward": ms.grads, "optimizer": ms.grads}
            if s.zero_stage in (1, 2) and step_fp32 and x.grad_accum == 1:
                # stage_1_and_2.py independent_gradient_partition_epilogue -> _release_ipg_buffers:
                # `self.grads_in_partition = None` (and the ipg buckets cleared) at the end of every
                # backward; step() frees `averaged_gradients` and the fp32 partition. So no gradient
                # memory exists from the forward until the first bucket copy in the backward
                # (measured: ZeRO-2 fp32, 2 gloo ranks, no Gradient bytes in the forward or at the
                # loss backward). Stage 3's grad_partitions_flat_buffer is persistent (kept above).
                g["forward"] = g["loss_backward"] = 0
            if s.zero_stage == 1 and step_fp32 and x.grad_accum > 1:
                # stage 1 reduces only at the accumulation boundary: a later micro-step's forward runs
                # with every param.grad held in full, p·T (memory.py rank_grads, measured on 4 ranks)
                g["forward"] = max(g["forward"], p * T)
            if step_fp32:
                # memory.py's grads carry max(step fp32 partition, in-flight gradient); the fp32
                # partition exists only inside step(), so the backward holds the persistent part + the
                # in-flight gradient (p * largest tensor) and the loss backward, before any gradient,
                # only the persistent part (stage3 grad_partitions_flat_buffer; measured: ZeRO-3 full,
                # 1 rank, 4P less than ms.grads at the loss backward). Stage 1 keeps other ranks'
                # large gradients (memory.py rank_grads held_large): left at ms.grads.
                in_flight = p * max((g_.numel for g_ in x.groups if g_.trainable), default=0)
                g.setdefault("loss_backward", g["forward"])
                if s.zero_stage == 3 or (s.zero_stage == 2 and x.grad_accum == 1):
                    g["backward"] = ms.grads - max(step_fp32, in_flight) + in_flight
                # ZeRO-2 with accumulation: the previous micro-steps' gradients (all_grad_tensors) next
                # to the new grads_in_partition and the in-flight gradient (memory.py rank_grads): the
                # backward keeps ms.grads, which is at least that
        b = ms.buffers
        b_fb = b   # buffers in the forward / backward
        if eng is Engine.DEEPSPEED and s.zero_stage == 3:
            gathered, held, everything = zero3_gathered(x)
            # partitioned_param_coordinator.py release_sub_module -> __params_to_release keeps every
            # gathered param reused within stage3_max_reuse_distance numel of the trace: after the
            # forward these (`held`) are still gathered at the loss backward; the prefetch window
            # (`gathered`, in ms.buffers) is only fetched when something is not held. The backward
            # releases each module after its last use in the step, and the optimizer step runs on the
            # partitions only (measured: ZeRO-3 LoRA, 2 gloo ranks: 170 MB gathered, all of the model).
            b_fb = b - gathered + held + (gathered if held < everything else 0)
            b = b - gathered
        # autocast's weight cache (cleared when the forward's autocast region exits) holds a 16-bit copy
        # of every fp32 weight used; the lm_head copy stays saved by its matmul until its backward
        lm_w = (m.lm_head_params or m.embedding_params) if autocast and full_ft else 0
        cached = p * _layer_trainable(x.groups, m) * n_ck if autocast and full_ft else 0
        instants = {
            "forward": [dict(grads=g["forward"], activations=kept + head + p * lm_w + cached + bsv_p, logits=0,
                             buffers=b_fb),
                        # the top layer's cp attention (all-to-all send copies / ring K/V blocks in flight)
                        dict(grads=g["forward"], activations=max(kept - top, 0) + head + p * lm_w + cached + cp_fwd,
                             logits=0, buffers=b_fb),
                        dict(grads=g["forward"], activations=kept + head + p * lm_w, logits=x.logits_forward_bytes,
                             buffers=b_fb)],
            "backward": [dict(grads=g.get("loss_backward", g["backward"]), activations=kept + head + p * lm_w,
                              logits=x.logits_backward_bytes, buffers=b_fb),
                         # a layer's backward: gradients in flight / partitioned (conservative: all of them)
                         dict(grads=g["backward"], activations=max(kept - top_bwd, 0) + head + working, logits=0,
                              buffers=b_fb)],
            "optimizer": [dict(grads=g["optimizer"], activations=0, logits=0, buffers=b)],
        }
        if eng is Engine.DEEPSPEED and s.zero_stage in (1, 2) and step_fp32:
            # step(): `flatten(averaged_gradients).to(fp32)` coexists with the 16-bit partition (the
            # instant above), then `self.averaged_gradients[i] = None` before optimizer.step(): the
            # update itself (temporaries added below) sees only the fp32 partition
            instants["optimizer"].append(dict(grads=step_fp32, activations=0, logits=0, buffers=b))
    # ---- optimizer temporaries (optimizer phase only)
    # AdamW is torch's fused kernel wherever it runs on the device: runtime/optim.py (DDP, FSDP2) and
    # emit/deepspeed.py (`torch_adam` + `fused`, over DeepSpeed's flat fp32 partition). The kernel
    # (torch/optim/adamw.py _fused_adamw -> aten::_fused_adamw_) updates params and states in place: no
    # temporaries (MemTracker under FakeTensorMode agrees: its optimizer phase is the model states alone).
    # bitsandbytes 8-bit updates in place; DeepSpeed's CPU optimizers and FusedLion need nothing on the
    # device (its step-time fp32 partition is in the grads term).
    opt_tmp = 0
    if eng is not Engine.DEEPSPEED and x.optimizer not in (Optimizer.ADAMW, Optimizer.ADAMW8BIT) and \
            s is not Strategy.FSDP_OFFLOAD:   # FSDP_OFFLOAD steps on the host
        # per-tensor loops (runtime.optim Lion / Adafactor, torch SGD momentum): two fp32 temporaries
        # of the largest local tensor
        opt_tmp = 2 * 4 * _largest_trainable(x.groups, x.shard_size if eng is Engine.FSDP else 1)
    instants["optimizer"][-1]["buffers"] += opt_tmp
    out = {}
    for ph in PHASES:
        worst = max(instants[ph], key=lambda d: sum(d.values()))
        out[ph] = dict(params=params, master_params=master, optimizer_states=states,
                       **{k: int(v) for k, v in worst.items()})
    return out


def candidate_phases(model: ModelSpec, groups: tuple[TensorGroup, ...], strategy: Strategy, ms: ModelStateBytes,
                     *, shard_size: int, method: Method, precision: Precision,
                     optimizer: Optimizer, micro_batch: int, seq_len: int, attention: Attention,
                     grad_ckpt: GradCkpt, selective_every: int, grad_accum: int, defer_grad_sync: bool,
                     loss: LossMode = LossMode.FULL, chunk_tokens: int = 512, activation_offload: bool = False,
                     runner: RunnerPath | None = None,
                     cuda_context: int = 0, parallel: ParallelDims | None = None, tiled_mlp_tiles: int = 1,
                     ckpt_offload: bool = False) -> tuple[dict[str, MemoryBreakdown], str]:
    """({phase: MemoryBreakdown}, peak phase) for one candidate; `loss`/`chunk_tokens` are the
    resolved loss mode of activations.logits_bytes (activations.resolve_loss: never auto here).
    `parallel`: the device mesh (None: tp 1, cp 1); `groups` is the whole model's inventory (tp-split
    here), `shard_size` memory.shard_group_size(..., parallel=parallel) and `ms` the mesh's
    model_state_bytes. Each rank holds micro_batch × seq_len / cp tokens. `tiled_mlp_tiles` > 1: every
    layer's MLP tiled; `ckpt_offload`: the checkpointed inputs in host RAM (both: compiler/savers.py)."""
    n_ck = checkpointed_layer_count(grad_ckpt, model.num_layers, selective_every)
    logits = logits_bytes(model, micro_batch=micro_batch, seq_len=seq_len, precision=precision, loss=loss,
                          chunk_tokens=chunk_tokens, parallel=parallel)
    bsv = tokens_per_rank(micro_batch, seq_len, parallel) * model.vocab_size
    if loss is LossMode.FULL:
        # forward: 16-bit logits + fp32 upcast + fp32 log_softmax output (runtime ce_sum); backward:
        # saved log_softmax output + nll gradient + log_softmax gradient, all fp32
        # (fp32: `.float()` is a no-op, so the flattened fp32 copy, the logits and the output coexist)
        # fp32 with micro_batch 1: `logits[:, :-1].flatten(0, 1)` (runtime/loss.py ce_sum) is a view (a
        # size-1 batch dim does not break contiguity), so no flattened copy: logits + log_softmax output
        # (measured: real MemTracker, fp32, micro batch 1: Logits = 2 x 4·B·S·V in the forward)
        fwd_logits = logits - 4 * bsv if precision.param_bytes == 2 or micro_batch == 1 else logits
        bwd_logits = min(12 * bsv, logits)
    else:
        fwd_logits = bwd_logits = logits
        # the chunked loss backward: every chunk's lm_head weight gradient is summed in autograd's input
        # buffer of the weight's AccumulateGrad node (torch/csrc/autograd/input_buffer.cpp: `aten.add`)
        # until the last chunk's backward ran: one more weight-sized gradient, in the unsharded grad's dtype
        # (measured: tests/runtime/test_long_seq_truth.py, V·h·4 = 8.2 MB at fp32; ~1 GB for 8B in bf16)
        if -(-tokens_per_rank(micro_batch, seq_len, parallel) // chunk_tokens) > 1:
            head_w = sum(g.total for g in groups if g.trainable and (
                g.name == "lm_head" or (model.tie_word_embeddings and g.name == "embed_tokens")))
            tp = parallel.tp if parallel is not None else 1
            g_elem = precision.trainable_bytes if strategy.engine is Engine.DDP else precision.param_bytes
            bwd_logits += g_elem * -(-head_w // tp)
    if runner is not None:   # the HF runners' fp32 logits copies by transformers version (compiler/runner.py)
        fwd_logits += runner.extra_fwd_logits_bytes * bsv
        bwd_logits += runner.extra_bwd_logits_bytes * bsv
    op_saved = (saved_bytes_per_token(model, precision, lora=lora_adapted(groups), parallel=parallel)
                if grad_ckpt is GradCkpt.OP else 0)
    x = PhaseInputs(model=model, groups=tp_local_groups(groups, parallel.tp if parallel else 1),
                    strategy=strategy, shard_size=shard_size,
                    method=method, precision=precision, optimizer=optimizer, micro_batch=micro_batch,
                    seq_len=seq_len, grad_ckpt_layers=n_ck, grad_accum=grad_accum, defer_grad_sync=defer_grad_sync,
                    layer_act_bytes_per_token=layer_bytes_per_token(model, precision, attention, seq_len,
                                                                    parallel=parallel, tiled_mlp=tiled_mlp_tiles > 1),
                    logits_forward_bytes=fwd_logits, logits_backward_bytes=bwd_logits,
                    activation_offload=activation_offload, op_saved_bytes_per_token=op_saved,
                    loss_in_root=bool(runner and runner.loss_in_root),
                    head_tokens=None if loss is LossMode.FULL else min(chunk_tokens, tokens_per_rank(micro_batch, seq_len, parallel)),
                    parallel=parallel, tiled_mlp_tiles=tiled_mlp_tiles,
                    ckpt_offload=ckpt_offload and n_ck > 0)
    terms = phase_terms(x, ms)
    phases = {ph: MemoryBreakdown(**t, cuda_context=cuda_context) for ph, t in terms.items()}
    peak = max(PHASES, key=lambda ph: (phases[ph].total, -PHASES.index(ph)))
    return phases, peak


def fsdp_side_stream_pools(model: ModelSpec, groups: tuple[TensorGroup, ...], strategy: Strategy, *,
                           shard_size: int, method: Method, precision: Precision,
                           parallel: ParallelDims | None = None) -> tuple[int, int]:
    """(all-gather pool, reduce-scatter pool): the bytes FSDP2's side streams hold in their own
    caching-allocator segments at their high-water mark, which the compute stream cannot reuse
    (compiler/allocator.py; (0, 0) for other engines). torch 2.13 _fully_shard/_fsdp_collectives.py:
    - foreach_all_gather allocates the flat all-gather output in the all-gather copy-in stream; in the
      forward the previous group's output stays referenced (comm_ctx.all_gather_state, freed when the next
      group's all-gather is waited on), so the root's and the first unit's outputs coexist: root + unit
      (none at one rank: no all-gather);
    - foreach_reduce allocates the reduce-scatter output in the reduce-scatter stream and the sharded
      gradients are views into it ("The RS output is allocated in the RS stream and used in the default
      stream (for optimizer)"), so a step's sharded gradients live in that pool; `zero_grad` frees them
      into it, not to the compute stream. CPUOffloadPolicy copies each output to the host at once: one
      group's output. (torch of 2024 also allocated the fp32 reduce-scatter *input* there:
      _composable/fsdp/_fsdp_collectives.py foreach_reduce_scatter at 01d66d2; not modelled.)"""
    if strategy.engine is not Engine.FSDP:
        return 0, 0
    N = shard_size
    g = tp_local_groups(groups, parallel.tp if parallel else 1)
    T_shard, unit, layer_tr, root, root_tr = _fsdp_units(g, N, method, precision, model.num_layers)
    tb = precision.trainable_bytes
    ag = root + unit if N > 1 else 0
    if strategy is Strategy.FSDP_OFFLOAD:
        return ag, tb * -(-max(layer_tr, root_tr) // N)
    return ag, tb * T_shard
