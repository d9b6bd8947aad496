"""The service's shard ingestion in process vs as Ray tasks (``moeplace serve --ray``): wall time and exact equality.

    python benchmarks/bench_serve_ray.py [--shards 16] [--half-life 50000] [--out-dir /tmp/bench_serve_ray]

The DeepSeek-V2-Lite dev trace (../shared/traces, 94,165 tokens, 26 x 64, top-6) is written as a Parquet
dataset of --shards shards, then ingested by ``ReplanService`` (placement/serve/service.py, no HTTP, no
decisions) from an empty STATE_DIR: in this process, and with ``ray`` (ray_jobs/ingest.py) with 1 and 2 tasks
at once on an embedded local Ray with 2 CPUs (its start-up is reported and not included), each twice from an
empty STATE_DIR, the faster shown. Each ingestion writes the checkpoint after every shard, as the service
does. "equal": the decayed window arrays and the ledger equal the in-process run's exactly.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from placement.plan import Plan, gpu_of_expert_to_phy2log
from placement.serve.service import ReplanService, ServiceConfig
from placement.trace.dataset import TraceWriter, open_trace

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "deepseek-v2-lite-chat.dev.npz"
G = 8


def write_dataset(out: Path, shards: int) -> tuple[Plan, int]:
    """The dev trace as ``shards`` Parquet shards, and the contiguous plan of its model on G GPUs."""
    src = open_trace(TRACE)
    routes = src.read_all(with_gates=False)
    T, E = routes.num_tokens, src.meta.num_experts
    step = -(-T // shards)
    with TraceWriter(out, src.meta, "bench") as w:
        for a in range(0, T, step):
            part = routes.take(np.arange(a, min(a + step, T)))
            w.write(part.expert_ids_TLK, part.seq_ids_T, part.token_pos_T)
            w.flush()
    gpu_of_LE = np.tile(np.arange(E) // (E // G), (src.meta.num_layers, 1))
    phy2log = gpu_of_expert_to_phy2log(gpu_of_LE, G)
    return Plan(G, 1, E, tuple(src.meta.layers), phy2log, model_name=src.meta.model_name), T * src.meta.num_layers


def ingest(plan: Plan, cfg: ServiceConfig) -> tuple[float, dict[str, np.ndarray], dict[str, int]]:
    """Seconds to ingest every shard of the watched dataset, the window's arrays and the ledger's shards."""
    service = ReplanService(plan, cfg)
    service.start(watch=False)
    try:
        t0 = time.perf_counter()
        service.ingest_pending()
        secs = time.perf_counter() - t0
        return secs, service.window.arrays(), dict(service.ledger.shards)
    finally:
        service.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--half-life", type=float, default=50_000)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/bench_serve_ray"))
    a = ap.parse_args()
    shutil.rmtree(a.out_dir, ignore_errors=True)
    plan, rows = write_dataset(a.out_dir / "ds", a.shards)
    base = ServiceConfig(a.out_dir / "state", a.out_dir / "ds", a.half_life)
    local = [ingest(plan, replace(base, state_dir=a.out_dir / f"state-{n}")) for n in range(2)]
    secs, ref, ref_shards = min(r[0] for r in local), local[0][1], local[0][2]
    print(f"{'ingestion':<16} {'rows':>11} {'seconds':>8} {'M rows/s':>8} {'equal':>5}")
    print(f"{'in process':<16} {rows:>11,} {secs:>8.2f} {rows / secs / 1e6:>8.2f} {'-':>5}")
    import ray

    from ray_jobs.driver import JobConfig, connect

    t0 = time.perf_counter()
    connect(JobConfig(out=a.out_dir))
    start_s = time.perf_counter() - t0
    try:
        for workers in (1, 2):
            runs = [
                ingest(
                    plan, replace(base, state_dir=a.out_dir / f"state-ray{workers}-{n}", ray=True, ray_workers=workers)
                )
                for n in range(2)
            ]
            secs = min(r[0] for r in runs)
            ok = all(sh == ref_shards and all(np.array_equal(got[k], ref[k]) for k in ref) for _, got, sh in runs)
            name = f"ray x{workers}"
            print(f"{name:<16} {rows:>11,} {secs:>8.2f} {rows / secs / 1e6:>8.2f} {'yes' if ok else 'NO':>5}")
    finally:
        ray.shutdown()
    print(f"embedded local Ray (2 CPUs) started in {start_s:.1f} s (not included); {a.shards} shards")


if __name__ == "__main__":
    main()
