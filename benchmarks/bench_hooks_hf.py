"""Routing-capture overhead on tiny Hugging Face MoE models from config: forward with vs. without hooks.

    python -m benchmarks.bench_hooks_hf [--models mixtral-tiny,olmoe-tiny] [--batch 8] [--seq 256]
                                        [--repeats 15] [--threads 2]

Each model is an ``hf-config:`` preset (random weights, no download) run through the profiler's own
forward (``profiler.hf_adapters.hf_forward``). Inputs are random byte ids, every token real. The two
variants are interleaved per repeat (ABBA) so drift hits both; "with RoutingRecorder" includes ``pop``
(the stack of all layers and the one copy to host arrays).

The overhead is the median of the per-repeat wall-time ratios "with / without", minus 1; the bar is
5 %. Also printed, for loaded machines where wall time is noisy: the ratio of the minimum wall times,
the median ratio of process CPU time, and the cost of ``pop`` alone as a share of the plain forward.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

OVERHEAD_BAR = 0.05


class Timings:
    """Per-repeat wall and process-CPU seconds of one variant."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []


def _time_interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, Timings]:
    times = {name: Timings() for name in fns}
    for _ in range(3):  # warm-up
        for fn in fns.values():
            fn()
    order = list(fns.items())
    for r in range(repeats):  # ABBA order: neither variant always runs first
        for name, fn in order if r % 2 == 0 else order[::-1]:
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].wall.append(time.perf_counter() - t0)
            times[name].cpu.append(time.process_time() - c0)
    return times


def bench_model(preset: str, batch: int, seq: int, repeats: int) -> tuple[dict[str, Timings], list[float]]:
    """Timings of both variants, and the wall seconds of each ``pop`` (part of the hooked variant)."""
    from profiler.api import load_model
    from profiler.capture import RoutingRecorder

    loaded = load_model(f"hf-config:{preset}")
    model = loaded.module
    gen = torch.Generator().manual_seed(0)
    ids_BS = torch.randint(3, 256, (batch, seq), generator=gen)
    mask_BS = torch.ones_like(ids_BS)
    valid_T = mask_BS.bool().reshape(-1)
    rec = RoutingRecorder(model, loaded.adapter)
    pop_s: list[float] = []

    def plain() -> None:
        loaded.forward(model, ids_BS, mask_BS)

    def hooked() -> None:
        with rec:
            loaded.forward(model, ids_BS, mask_BS)
            t0 = time.perf_counter()
            rec.pop(valid_T)
            pop_s.append(time.perf_counter() - t0)

    with torch.inference_mode():
        times = _time_interleaved({"without hooks": plain, "with RoutingRecorder": hooked}, repeats)
    return times, pop_s[-repeats:]


def _pair_ratio(base: list[float], hooked: list[float]) -> float:
    return statistics.median(h / p for p, h in zip(base, hooked, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mixtral-tiny,olmoe-tiny", help="comma-separated hf-config presets")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    tokens = a.batch * a.seq
    print(f"batch {a.batch} x {a.seq} tokens, {a.repeats} interleaved repeats, {a.threads} threads")
    print(f"{'model':<18}{'variant':<22}{'median ms':>11}{'min ms':>9}{'cpu med ms':>12}{'tok/s':>10}")
    summary = []
    for preset in a.models.split(","):
        times, pop_s = bench_model(preset, a.batch, a.seq, a.repeats)
        for name, t in times.items():
            med = statistics.median(t.wall)
            print(
                f"{preset:<18}{name:<22}{med * 1e3:>11.2f}{min(t.wall) * 1e3:>9.2f}"
                f"{statistics.median(t.cpu) * 1e3:>12.2f}{tokens / med:>10,.0f}"
            )
        base, hooked = times["without hooks"], times["with RoutingRecorder"]
        wall_ratio = _pair_ratio(base.wall, hooked.wall)
        min_ratio = min(hooked.wall) / min(base.wall)
        cpu_ratio = _pair_ratio(base.cpu, hooked.cpu)
        pop_share = statistics.median(pop_s) / statistics.median(base.wall)
        overhead = wall_ratio - 1
        verdict = "ok" if overhead <= OVERHEAD_BAR else "OVER BAR"
        summary.append(
            f"{preset:<18}{wall_ratio:>11.3f}{min_ratio:>11.3f}{cpu_ratio:>11.3f}{pop_share:>10.2%}"
            f"   {overhead:+.1%} ({verdict})"
        )
    print()
    print(f"{'with/without':<18}{'wall med':>11}{'wall min':>11}{'cpu med':>11}{'pop/fwd':>10}   overhead (bar 5%)")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
