"""Routing graph build as Ray tasks vs one process: wall time and exact equality.

    python benchmarks/bench_ray_graph.py [--v3-tokens 100000] [--shards 8] [--out-dir /tmp/bench_ray_graph]

Datasets (Parquet, --shards shards each): the DeepSeek-V2-Lite dev trace (../shared/traces, 94,165 tokens, 26 x
64, top-6) and a synthetic DeepSeek-V3-shape trace (58 x 256, top-8, --v3-tokens tokens). Each is counted as
``moeplace plan`` counts it (loads, transitions, prompt-fold loads; no co-activation) by ``build_graph`` in this
process and by ``build_graph_ray`` with 1 and 2 workers on one embedded local Ray (2 CPUs; its start-up is
reported once and not included). "equal": every count array of the Ray build equals the single-process one.
Each build runs twice; the table shows the faster run.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import ray

from placement.graph import PROMPT_FOLDS, RoutingGraph, build_graph
from placement.trace.dataset import TraceWriter, open_trace
from placement.trace.schema import RouteArrays, TraceMeta
from placement.trace.synthetic import synthetic_trace
from ray_jobs.driver import JobConfig, connect
from ray_jobs.graph import build_graph_ray

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "deepseek-v2-lite-chat.dev.npz"


def write(out: Path, meta: TraceMeta, routes: RouteArrays, shards: int) -> Path:
    T = routes.num_tokens
    step = -(-T // shards)
    with TraceWriter(out, meta, "bench") as w:
        for a in range(0, T, step):
            part = routes.take(np.arange(a, min(a + step, T)))
            w.write(part.expert_ids_TLK, part.seq_ids_T, part.token_pos_T)
            w.flush()
    return out


def best(fn: Callable[[], RoutingGraph]) -> tuple[float, RoutingGraph]:
    times, g = [], None
    for _ in range(2):
        t0 = time.perf_counter()
        g = fn()
        times.append(time.perf_counter() - t0)
    assert g is not None
    return min(times), g


def same(a: RoutingGraph, b: RoutingGraph) -> bool:
    arrays = ("load_LE", "trans_LEE", "fold_load_SLE")
    return a.num_tokens == b.num_tokens and all(np.array_equal(getattr(a, n), getattr(b, n)) for n in arrays)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--v3-tokens", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/bench_ray_graph"))
    a = ap.parse_args()
    shutil.rmtree(a.out_dir, ignore_errors=True)
    src = open_trace(TRACE)
    datasets = {"deepseek-v2-lite": write(a.out_dir / "v2", src.meta, src.read_all(with_gates=False), a.shards)}
    meta, routes = synthetic_trace(58, 256, 8, a.v3_tokens, seed=0, model_name="synthetic-v3")
    datasets["synthetic v3 shape"] = write(a.out_dir / "v3", meta, routes, a.shards)
    t0 = time.perf_counter()
    connect(JobConfig(out=a.out_dir))
    print(f"embedded local Ray (2 CPUs) started in {time.perf_counter() - t0:.1f} s")
    print(f"{'dataset':<20} {'rows':>11} {'build':<16} {'seconds':>8} {'M rows/s':>8} {'equal':>5}")
    try:
        for name, path in datasets.items():
            trace = open_trace(path)
            rows = trace.num_tokens * trace.meta.num_layers
            secs, ref = best(partial(build_graph, trace, with_coact=False, num_folds=PROMPT_FOLDS))
            print(f"{name:<20} {rows:>11,} {'one process':<16} {secs:>8.2f} {rows / secs / 1e6:>8.2f} {'-':>5}")
            for workers in (1, 2):
                secs, g = best(
                    partial(build_graph_ray, trace, num_workers=workers, with_coact=False, num_folds=PROMPT_FOLDS)
                )
                ok = "yes" if same(g, ref) else "NO"
                print(f"{'':<20} {'':>11} {f'ray x{workers}':<16} {secs:>8.2f} {rows / secs / 1e6:>8.2f} {ok:>5}")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
