"""Benchmark: routing-graph build streamed from a Parquet trace dataset (DeepSeek-V3 shape).

Writes a synthetic dataset of ``--rows`` token-layer rows (58 MoE layers x 256 experts, top-8, skewed expert
popularity, and cross-layer dependency: each next-layer choice follows a fixed per-layer map of the current
choice with probability 0.6) to a temp dir, then times ``build_graph`` over the first quarter and over all
of it, each in a fresh subprocess so that peak RSS (ru_maxrss) is the build's own. Prints one table.

    python benchmarks/bench_graph.py [--rows 20000000] [--keep DIR]

Dimension key: T tokens, L MoE layers, K top-k, E experts.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

L, E, K = 58, 256, 8
FOLLOW = 0.6


def synth_batch(rng: np.random.Generator, T: int, pop_E: np.ndarray, next_LE: np.ndarray) -> np.ndarray:
    """int16 [T, L, K]: layer 0 drawn from ``pop_E``; layer l+1 follows next_LE[l] of layer l w.p. FOLLOW."""
    ids_TLK = np.empty((T, L, K), np.int16)
    ids_TLK[:, 0] = rng.choice(E, size=(T, K), p=pop_E)
    for l in range(L - 1):  # loop over the small dimension only
        follow = rng.random((T, K)) < FOLLOW
        fresh = rng.choice(E, size=(T, K), p=pop_E)
        ids_TLK[:, l + 1] = np.where(follow, next_LE[l][ids_TLK[:, l]], fresh)
    return ids_TLK


def write_dataset(out: Path, rows: int, seed: int = 0) -> float:
    from placement.trace.dataset import TraceWriter
    from placement.trace.schema import TraceMeta

    rng = np.random.default_rng(seed)
    pop_E = 1.0 / np.arange(1, E + 1) ** 0.6
    pop_E = rng.permutation(pop_E / pop_E.sum())
    next_LE = np.stack([rng.permutation(E) for _ in range(L - 1)])
    meta = TraceMeta("synthetic-deepseek-v3", E, K, tuple(range(3, 3 + L)), source="bench_graph")
    T_total, T_batch = rows // L, 32768
    t0 = time.perf_counter()
    with TraceWriter(out, meta, "bench") as w:
        for a in range(0, T_total, T_batch):
            T = min(T_batch, T_total - a)
            w.write(synth_batch(rng, T, pop_E, next_LE), np.arange(a, a + T) // 512, np.arange(a, a + T) % 512)
    return time.perf_counter() - t0


def child(dataset: str, fraction: float, coact: bool) -> None:
    """Run in a subprocess: build the graph of the first ``fraction`` of the shards; print JSON."""
    from placement.graph import build_graph, graph_from_routes
    from placement.trace.dataset import ParquetTrace, open_parquet_trace

    full = open_parquet_trace(dataset)
    n = max(1, round(len(full.shards) * fraction))
    trace = ParquetTrace(full.path, full.meta, full.shards[:n])
    graph_from_routes(np.zeros((2, L, K), np.int16), full.meta, with_coact=coact)  # JIT warm-up
    # Warm-up pass over one shard (thread pools, allocator, page cache), then the timed pass over all.
    build_graph(ParquetTrace(full.path, full.meta, full.shards[:1]), with_coact=coact)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = []
    for _ in range(2):  # first pass (allocator still growing), then a second pass in the same process
        t0 = time.perf_counter()
        g = build_graph(trace, with_coact=coact)
        seconds.append(time.perf_counter() - t0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rows = g.num_tokens * L
    if not 0 < int(g.load_LE.sum()) <= rows * K:  # repeated ids count once
        raise SystemExit(f"load sum {int(g.load_LE.sum())} not in 1..rows*K={rows * K}")
    out = {"rows": rows, "seconds": seconds[0], "seconds2": seconds[1]}
    print(json.dumps({**out, "rss_base_mb": rss0 / 1024, "rss_peak_mb": rss1 / 1024}))


def profile(dataset: str) -> dict[str, float]:
    """Split the time of one pass: Parquet decode + conversion vs. the numba kernel."""
    from placement.graph import GraphAccumulator
    from placement.trace.dataset import open_parquet_trace

    trace = open_parquet_trace(dataset)
    acc = GraphAccumulator(trace.meta, with_coact=False)
    acc.add(np.zeros((2, L, K), np.int16))
    t_read = t_kernel = 0.0
    t0 = time.perf_counter()
    for b in trace.iter_batches(65536, with_ids=False):
        t1 = time.perf_counter()
        t_read += t1 - t0
        acc.add(b.expert_ids_TLK)
        t0 = time.perf_counter()
        t_kernel += t0 - t1
    return {"read_s": t_read, "kernel_s": t_kernel}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20_000_000)
    ap.add_argument("--keep", type=Path, help="write the dataset here and keep it (default: a temp dir)")
    ap.add_argument("--child", nargs=3, metavar=("DATASET", "FRACTION", "COACT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]), args.child[2] == "1")
        return
    from placement.trace.dataset import DATASET_FILE, metadata_file

    tmp = Path(tempfile.mkdtemp(prefix="bench_graph."))
    ds = args.keep or tmp / "ds"
    try:
        if not metadata_file(ds, DATASET_FILE).exists():
            wt = write_dataset(ds, args.rows)
            print(f"wrote {args.rows:,} rows ({L} layers x {E} experts, top-{K}) in {wt:.1f} s to {ds}")
        size = sum(p.stat().st_size for p in ds.glob("part-*.parquet")) / 2**20
        print(f"dataset: {size:.0f} MiB on disk")
        results = []
        for coact in (False, True):
            for fraction in (0.25, 1.0):
                cmd = [sys.executable, __file__, "--child", str(ds), str(fraction), "1" if coact else "0"]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results.append((coact, r))
        print(
            f"{'coact':>6} {'rows':>12} {'seconds':>8} {'M rows/s':>9} {'2nd pass':>9} "
            f"{'base MB':>8} {'peak MB':>8} {'growth MB':>9}"
        )
        for coact, r in results:
            print(
                f"{'yes' if coact else 'no':>6} {r['rows']:>12,} {r['seconds']:>8.2f} "
                f"{r['rows'] / r['seconds'] / 1e6:>9.2f} {r['rows'] / r['seconds2'] / 1e6:>9.2f} "
                f"{r['rss_base_mb']:>8.0f} {r['rss_peak_mb']:>8.0f} "
                f"{r['rss_peak_mb'] - r['rss_base_mb']:>9.0f}"
            )
        p = profile(str(ds))
        print(f"profile (all rows, no coact): Parquet read+convert {p['read_s']:.2f} s, kernel {p['kernel_s']:.2f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
