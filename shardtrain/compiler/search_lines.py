"""The search over one (strategy, mesh) pair (pure): which (checkpointing, defer, micro batch, saver
combination) points are evaluated, pruned so that the fastest fit cannot be lost (``search_lines``: the
largest micro batch that fits per line, bisection, saver dominance), and under ``loss: auto`` one pass per
loss path (``_per_loss_path``, which sets compiler/candidate_eval.py ``LOSS_PATH``). The caller's ``ev``
evaluates and records each point. Split out of compiler/planner.py."""
from __future__ import annotations

import functools

from shardtrain.compiler.activations import checkpointed_layer_count, tokens_per_rank
from shardtrain.compiler.candidate_eval import LOSS_PATH
from shardtrain.compiler.model import ModelSpec
from shardtrain.compiler.plan import Candidate
from shardtrain.compiler.runner import runner_path
from shardtrain.compiler.savers import Savers, dominates, savers_only_shrink
from shardtrain.compiler.specs import Engine, GradCkpt, LossMode, ParallelDims, Strategy, TrainSpec


def search_lines(ev, s: Strategy, mesh: ParallelDims, ckpts: list[GradCkpt], micros: list[int],
                 savers: list[Savers], train: TrainSpec, shrink=None) -> None:
    """Evaluate one (strategy, mesh) pair's candidates with pruning that cannot lose the fastest fit:
    memory only grows with the micro batch and shrinks with more checkpointing, and the step time only
    falls with the micro batch (fewer micro-steps, higher MFU: compiler/cost.py). So: the most-saving
    checkpointing at the smallest micro batch first — if that does not fit, nothing on this pair does;
    otherwise per line (checkpointing, defer) the largest micro batch that fits (the largest first, then
    bisection).

    Saver combinations (compiler/savers.py; ``savers[0]`` uses none): a saver only adds step time (PCIe
    copies, recomputed MLP forwards), so a combination can win only above the largest micro batch at which
    a combination with a subset of its savers fit (``Savers`` order: savers.dominates). Where ``shrink(ckpt,
    micro, savers)`` says each saver only lowers the device bytes (savers.savers_only_shrink), a
    combination also cannot fit where one with a superset of its savers missed on GPU memory alone — so
    the most-saving combinations are searched right after the plain one, and the others only in between.
    A point already no faster than the pair's best fit without savers is not tried with them (the loss
    path may differ between the two: chunked costs 2·h·V FLOPs per token, small next to a saver's cost);
    once the pair's fastest point fits, nothing else is tried. Checkpoint offload is not tried without
    checkpointed layers (it would change nothing).
    ``ev(ckpt, micro, defer, savers)`` evaluates a candidate and records it."""
    lo = micros[0]
    fitted: dict[Savers, dict[tuple[GradCkpt, bool], int]] = {}    # largest micro batch that fit, per line
    gpu_miss: dict[Savers, dict[tuple[GradCkpt, bool], int]] = {}  # smallest that missed on GPU memory alone
    plain: dict[tuple[GradCkpt, int, bool], float] = {}            # step times without savers
    best = float("inf")
    order = _saver_order(savers)
    done: list[Savers] = []

    def point(sv: Savers, ck: GradCkpt, mb: int, d_ok: bool) -> bool:
        nonlocal best
        c = ev(ck, mb, d_ok, sv)
        if sv == savers[0]:
            plain[(ck, mb, d_ok)] = c.step_time_s
        line = (ck, d_ok)
        if c.fits:
            fitted[sv][line] = max(fitted[sv].get(line, 0), mb)
            best = min(best, c.step_time_s)
        elif all("per GPU" in w for w in c.why_not) and (shrink is None or shrink(ck, mb, sv)):
            gpu_miss[sv][line] = min(gpu_miss[sv].get(line, 10**12), mb)
        return c.fits

    for sv in order:
        fitted[sv], gpu_miss[sv] = {}, {}
        cks = [c for c in ckpts if not (sv.ckpt_offload and c is GradCkpt.NONE)]
        below = [o for o in done if dominates(o, sv)]     # fewer savers: faster at the same point
        above = [o for o in done if dominates(sv, o)]     # more savers: less memory where shrink holds
        done.append(sv)
        if not cks:
            continue

        def lower(line, below=below):
            return max([fitted[o].get(line, 0) for o in below], default=0)

        def upper(line, above=above):
            return min([gpu_miss[o].get(line, 10**12) for o in above], default=10**12)

        floor_line = (cks[-1], False)
        if not lower(floor_line) >= lo:   # else the floor fit with fewer savers: something fits
            if upper(floor_line) <= lo or not point(sv, cks[-1], lo, False):
                continue
        for ck in cks:
            for d_ok in (False, True):
                line = (ck, d_ok)
                # the micro batches that can still win on this line: above a fit with fewer savers, below a
                # GPU miss with more, with accumulation for a deferred sync (FSDP_OFFLOAD: a deferred sync
                # would keep unsharded fp32 grads on the GPU, the very memory the offload frees), and not
                # already no faster than the pair's best fit without savers
                opts = [mb for mb in micros if lower(line) < mb < upper(line) and mb > fitted[sv].get(line, 0)
                        and (not d_ok or (s.engine is Engine.FSDP and s is not Strategy.FSDP_OFFLOAD
                                          and train.global_batch_size // (mb * mesh.dp) > 1))
                        and plain.get((ck, mb, d_ok), 0.0) < best]
                _largest_fit(lambda mb, ck=ck, d_ok=d_ok, sv=sv: point(sv, ck, mb, d_ok), opts)
        if fitted[savers[0]].get((ckpts[0], False), 0) == micros[-1]:
            break   # the pair's fastest point fits without savers: no combination can beat it


def _saver_order(savers: list[Savers]) -> list[Savers]:
    """The plain combination, then the most-saving ones (no other has more savers), then the rest."""
    rest = savers[1:]
    top = [sv for sv in rest if not any(o != sv and dominates(sv, o) for o in rest)]
    return savers[:1] + top + [sv for sv in rest if sv not in top]


def savers_shrink(model: ModelSpec, train: TrainSpec, mesh: ParallelDims, ck: GradCkpt, micro: int,
                  sv: Savers) -> bool:
    n_ck = checkpointed_layer_count(ck, model.num_layers, train.selective_every) if sv.ckpt_offload else 2
    return savers_only_shrink(model, train.precision, tokens_per_rank(micro, train.seq_len, mesh), sv.tiles, n_ck,
                              mesh)


def _largest_fit(fits, options: list[int]) -> None:
    """Evaluate ``fits`` on ascending ``options`` until the largest that fits is known: the largest first
    (it fits in the common case), then bisection (memory only grows with the micro batch)."""
    if not options or fits(options[-1]):
        return
    lo, hi = -1, len(options) - 1   # options[hi] does not fit; options[lo] fits (-1: none known)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(options[mid]):
            lo = mid
        else:
            hi = mid


def _per_loss_path(search):
    """loss auto (the default): each (strategy, mesh) pair is searched with the full loss path, then, when
    the runner has it (compiler/runner.py) and the full path does not fit at the pair's fastest point, with
    the chunked one (at the same point chunked only adds work: compiler/cost.py). Every candidate of both
    passes competes, so chunked is chosen exactly when it lets a faster plan fit or the full path does not
    fit (compiler/loss_choice.py says which)."""
    @functools.wraps(search)
    def both(ev, s, mesh, ckpts, micros, savers, train, *rest):
        if train.loss is not LossMode.AUTO:
            return search(ev, s, mesh, ckpts, micros, savers, train, *rest)
        full: dict[tuple, Candidate] = {}

        def ev_full(*point):
            full[point] = c = ev(*point)
            return c

        def ev_chunked(*point):
            # where the full path fits, the chunked one is slower (and so is every smaller micro batch on
            # the line): the full candidate stands in, which ends the line without a new evaluation
            known = full.get(point)
            return known if known is not None and known.fits else ev(*point)

        token = LOSS_PATH.set(LossMode.FULL)
        try:
            search(ev_full, s, mesh, ckpts, micros, savers, train, *rest)
            top = full.get((ckpts[0], micros[-1], False, savers[0]))
            if not runner_path(train.runner, train.runner_transformers).chunked_loss or (top and top.fits):
                return None
            LOSS_PATH.set(LossMode.CHUNKED)
            # the pair's fastest point bounds every chunked candidate on it (less checkpointing and larger
            # micro batches only speed up): no chunked pass when that bound is no faster than a full fit
            best_full = min((c.step_time_s for c in full.values() if c.fits), default=float("inf"))
            if ev_chunked(ckpts[0], micros[-1], False, savers[0]).step_time_s >= best_full:
                return None
            return search(ev_chunked, s, mesh, ckpts, micros, savers, train, *rest)
        finally:
            LOSS_PATH.reset(token)
    return both


search_lines = _per_loss_path(search_lines)
