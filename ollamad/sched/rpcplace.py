"""Placement over RPC workers (pure): which plans spread a model onto workers, and whether
the workers they name can take them now.

A split plan offloads the last ``n`` repeating layers (``--n-gpu-layers n``; with all of
them, the output layer too) to the workers named in ``--rpc``, in shares proportional to
each worker's free memory (``--tensor-split``). Its ``estimate`` is what stays on this
machine, ``remote`` what each worker gets. Candidates go from the least spread to the
most, after the local plans ("local first"), or alone when the model is forced onto the
workers. A worker serves one llama-server at a time (ggml-rpc-server's accept loop), so a
worker held by one runner cannot be in another runner's plan: that, plus each share
fitting the worker's free memory, is what keeps two runners from oversubscribing one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace

from ollamad.models.plan import RpcMode, RunnerPlan

STEPS = 4  # split candidates per local plan: 1/4, 2/4, 3/4, all of the layers remote
# an RPC device's compute buffer, in units of the local estimate: 70 MiB for 43 MiB estimated
# on the small test model (4 slots x 4096), each worker alike; rounded up
REMOTE_COMPUTE = 2


def split_plan(plan: RunnerPlan, workers: Mapping[str, float], layers: int) -> RunnerPlan | None:
    """``plan`` with its last ``layers`` repeating layers on ``workers`` (endpoint -> free bytes)."""
    est = plan.detail
    if est is None or est.layers <= 0 or not workers:
        return None
    eps = sorted(workers)
    room = [max(workers[e], 0) for e in eps]
    if sum(room) <= 0:
        return None
    layers = min(max(layers, 1), est.layers)
    moved = layers * est.per_layer
    output = est.weights - est.layer_weights if layers == est.layers else 0  # output (and norm) weights
    # every worker keeps a compute buffer of its own; this machine keeps one too
    shares = tuple(r / sum(room) for r in room)
    remote = tuple(int((moved + output) * s) + REMOTE_COMPUTE * est.compute for s in shares)
    local = max(plan.estimate - moved - output, est.compute + est.overhead)
    ngl = layers + 1 if layers == est.layers else layers
    return replace(plan, rpc=tuple(eps), remote=remote, tensor_split=tuple(round(s, 4) for s in shares),
                   n_gpu_layers=ngl, estimate=local)


def with_workers(local: tuple[RunnerPlan, ...], workers: Mapping[str, float], mode: RpcMode) -> tuple[RunnerPlan, ...]:
    """The candidate plans for ``mode``: local ones first, then splits from least to most remote."""
    if mode == "never" or not workers:
        return () if mode == "always" else local
    splits: list[RunnerPlan] = []
    for plan in local:
        n = plan.detail.layers if plan.detail is not None else 0
        for k in sorted({math.ceil(n * i / STEPS) for i in range(1, STEPS + 1)}):
            p = split_plan(plan, workers, k)
            if p is not None and p not in splits:
                splits.append(p)
    return tuple(splits) if mode == "always" else local + tuple(splits)


def workers_fit(plan: RunnerPlan, workers: Mapping[str, float], others: Iterable[RunnerPlan]) -> bool:
    """Can ``plan``'s workers take it now: each up, held by none of ``others``, share <= free?"""
    if not plan.rpc:
        return True
    held = {ep for p in others for ep in p.rpc}
    return all(ep in workers and ep not in held and need <= workers[ep]
               for ep, need in zip(plan.rpc, plan.remote, strict=True))


def describe_split(plan: RunnerPlan) -> str:
    mib = 1024 * 1024
    return ", ".join(f"{ep} ({need / mib:.0f} MiB)" for ep, need in zip(plan.rpc, plan.remote, strict=True))


def split_note(plan: RunnerPlan, lost: bool) -> str:
    """Said after an error from a runner that broke off, when the model was split over workers."""
    if not lost or not plan.rpc:
        return ""
    return (f" (the model was split over RPC workers {', '.join(plan.rpc)}: one of them went away or "
            "stopped answering; the next request is planned over the workers still up)")
