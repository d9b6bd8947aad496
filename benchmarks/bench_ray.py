"""Ray profiling throughput and start-up cost: single process vs 1 and 2 Ray workers (data and expert mode).

    python benchmarks/bench_ray.py [--prompts 64] [--out-dir /tmp/bench_ray]

One embedded local Ray (2 CPUs) is started once ("Ray start": ``ray.init``) and shared by the Ray rows
("workers ready": actor creation plus model load, and the gloo group in expert mode). Workers use one
torch thread each; the single-process row does too.
tok/s counts tracing only (after the workers are ready). On a shared machine numbers are noisy: take the
median of a few runs.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import ray
import torch

from placement.trace.dataset import TraceWriter
from profiler.api import load_model, load_prompts, profile_prompts
from ray_jobs.driver import JobConfig, connect, run_job


def single_process(out: Path, n: int) -> tuple[float, int]:
    torch.set_num_threads(1)
    model = load_model("builtin")
    prompts = load_prompts("builtin")[:n]
    t0 = time.perf_counter()
    with TraceWriter(out, model.trace_meta()) as w:
        tokens = profile_prompts(model, prompts, list(range(n)), w, batch_size=8)
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--out-dir", type=Path, default=Path("/tmp/bench_ray"))
    a = ap.parse_args()
    shutil.rmtree(a.out_dir, ignore_errors=True)
    rows = []
    secs, tokens = single_process(a.out_dir / "single", a.prompts)
    rows.append(("single process", "-", "-", secs, tokens))
    t0 = time.perf_counter()
    connect(JobConfig(out=a.out_dir))
    ray_start = time.perf_counter() - t0
    try:
        for mode, workers in (("data", 1), ("data", 2), ("expert", 2)):
            res = run_job(JobConfig(out=a.out_dir / f"{mode}{workers}", limit=a.prompts, workers=workers, mode=mode))
            rows.append((f"ray {mode} x{workers}", f"{ray_start:.1f}", f"{res.startup_s:.1f}", res.seconds, res.tokens))
    finally:
        ray.shutdown()
    print(f"{a.prompts} builtin prompts, demo MoE, {torch.get_num_threads()} torch thread(s) per process")
    print(f"{'run':<18} {'Ray start s':>11} {'workers ready s':>15} {'trace s':>8} {'tokens':>7} {'tok/s':>8}")
    for name, start, ready, s, t in rows:
        print(f"{name:<18} {start:>11} {ready:>15} {s:>8.2f} {t:>7} {t / s:>8,.0f}")


if __name__ == "__main__":
    main()
