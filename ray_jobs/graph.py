"""Routing graph of a large trace as Ray tasks: parts of the trace counted in parallel, count arrays summed.

``build_graph_ray(spec, ...)`` opens the trace on the driver (metadata and shard footers only), splits it
(``split_trace``: a Parquet dataset's shards into groups of about equal rows, an in-memory ``.npz`` into equal
token ranges), counts each part with ``placement.graph.build_graph`` in a Ray task (``count_part``, a plain
function the task wraps) and sums the parts' arrays as they arrive (``sum_graphs``). Every count of
``RoutingGraph`` (loads, transitions, co-activation, prompt-fold loads) is an integer sum over tokens and a
token's prompt fold depends on its seq id alone, so the result equals the single-process build exactly, for
any split and any order of arrival.

At most ``num_workers`` tasks run at once (one CPU and one numba thread each). Without ``address`` (and
``RAY_ADDRESS``) an embedded local Ray with ``num_cpus`` CPUs is started and shut down again; a process that
is already connected keeps its connection. On a cluster, the trace path must be readable from every node.

Dimension key: L MoE layers, E experts, S prompt folds.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from placement.graph import RoutingGraph, build_graph
from placement.trace.dataset import ArrayTrace, ParquetTrace, Trace, open_trace
from placement.trace.schema import TraceError
from ray_jobs.driver import JobConfig, RayJobError, connect, raise_one_line

__all__ = ["build_graph_ray", "count_part", "split_trace", "sum_graphs"]


def split_trace(trace: Trace, num_parts: int) -> list[Trace]:
    """At most ``num_parts`` disjoint parts covering ``trace``: shard groups of about equal rows (largest shard
    first into the lightest group), or equal token ranges of an in-memory trace; no part is empty."""
    if num_parts < 1:
        raise RayJobError(f"num_parts={num_parts}: must be >= 1")
    if isinstance(trace, ArrayTrace):
        T = trace.routes.num_tokens
        bounds = np.linspace(0, T, min(num_parts, max(T, 1)) + 1).astype(np.int64)
        return [
            ArrayTrace(trace.path, trace.meta, trace.routes.take(np.arange(a, b)))
            for a, b in itertools.pairwise(bounds.tolist())
            if b > a
        ]
    import pyarrow.parquet as pq

    rows_X = np.array([pq.ParquetFile(p).metadata.num_rows for p in trace.shards], dtype=np.int64)
    groups: list[list[Path]] = [[] for _ in range(min(num_parts, len(trace.shards)))]
    load_N = np.zeros(len(groups), dtype=np.int64)
    for x in np.argsort(-rows_X, kind="stable"):
        n = int(np.argmin(load_N))
        groups[n].append(trace.shards[x])
        load_N[n] += rows_X[x]
    return [ParquetTrace(trace.path, trace.meta, tuple(sorted(g))) for g in groups if g]


def count_part(part: Trace, with_coact: bool, num_folds: int) -> RoutingGraph:
    """The graph of one part (what each Ray task runs): ``build_graph`` with the caller's options."""
    return build_graph(part, with_coact=with_coact, num_folds=num_folds)


def sum_graphs(parts: Sequence[RoutingGraph]) -> RoutingGraph:
    """The graph of the union of disjoint parts of one trace: every count array summed; co-activation and fold
    loads only if every part has them."""
    if not parts:
        raise RayJobError("no graph parts to sum; the trace has no shards")
    first = parts[0]
    for g in parts[1:]:
        if g.load_LE.shape != first.load_LE.shape or g.meta.model_name != first.meta.model_name:
            raise RayJobError(
                f"graph parts of {g.meta.model_name} {list(g.load_LE.shape)} and {first.meta.model_name} "
                f"{list(first.load_LE.shape)} cannot be summed; count parts of one trace"
            )

    def total(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        present = [a for a in arrays if a is not None]
        return np.sum(present, axis=0) if len(present) == len(arrays) else None

    return replace(
        first,
        num_tokens=sum(g.num_tokens for g in parts),
        load_LE=np.sum([g.load_LE for g in parts], axis=0),
        trans_LEE=np.sum([g.trans_LEE for g in parts], axis=0),
        coact_LEE=total([g.coact_LEE for g in parts]),
        fold_load_SLE=total([g.fold_load_SLE for g in parts]),
    )


def _count_task(part: Trace, with_coact: bool, num_folds: int) -> RoutingGraph:
    """Body of the Ray task: one numba thread (the task holds one CPU), then ``count_part``."""
    import numba

    numba.set_num_threads(1)
    return count_part(part, with_coact, num_folds)


def build_graph_ray(
    spec: str | Path | Trace,
    *,
    address: str | None = None,
    num_workers: int = 2,
    num_tasks: int | None = None,
    with_coact: bool = True,
    num_folds: int = 0,
    keep_top: int | None = None,
    num_experts: int | None = None,
    num_cpus: int = 2,
    max_retries: int = 3,
    on_progress: Callable[[int], None] | None = None,
) -> RoutingGraph:
    """``placement.graph.build_graph`` of a trace (spec or opened trace) as Ray tasks; the same graph exactly.

    ``num_tasks`` parts (default 2 x ``num_workers``, at most one per shard) run ``num_workers`` at a time;
    ``on_progress(tokens)`` is called as each part is summed. A damaged shard raises its ``TraceError``."""
    import ray

    if num_workers < 1 or (num_tasks is not None and num_tasks < 1):
        raise RayJobError(f"--workers {num_workers}, tasks {num_tasks}: both must be >= 1")
    trace = spec if isinstance(spec, (ParquetTrace, ArrayTrace)) else open_trace(spec, num_experts=num_experts)
    parts = split_trace(trace, num_tasks or 2 * num_workers)
    owns = not ray.is_initialized()
    if owns:
        connect(JobConfig(out=Path("."), address=address, num_cpus=num_cpus))
    task = ray.remote(num_cpus=1, max_retries=max_retries)(_count_task)
    todo = list(reversed(parts))
    pending: dict[Any, int] = {}
    graph: RoutingGraph | None = None
    try:
        while todo or pending:
            while todo and len(pending) < num_workers:
                part = todo.pop()
                pending[task.remote(part, with_coact, num_folds)] = part.num_tokens
            ready, _ = ray.wait(list(pending), num_returns=1)
            tokens = pending.pop(ready[0])
            try:
                got: RoutingGraph = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, TraceError):
                    raise TraceError(str(exc.cause)) from None
                raise RayJobError(f"a graph task failed: {raise_one_line(exc)}") from exc
            graph = got if graph is None else sum_graphs([graph, got])
            if on_progress is not None:
                on_progress(tokens)
    finally:
        for ref in pending:
            ray.cancel(ref)
        if owns:
            ray.shutdown()
    if graph is None:
        raise RayJobError(f"{trace.path}: nothing to count")
    return graph.keep_top_pairs(keep_top) if keep_top else graph
