"""Routing-capture overhead on tiny Hugging Face MoE models from config: forward with vs. without hooks.

    python -m benchmarks.bench_hooks_hf [--models mixtral-tiny,olmoe-tiny] [--batch 8] [--seq 256]
                                        [--repeats 15] [--threads 2]

Each model is an ``hf-config:`` preset (random weights, no download) run through the profiler's own
forward (``profiler.hf_adapters.hf_forward``). Inputs are random byte ids, every token real. The two
variants are interleaved per repeat so drift hits both; "with RoutingRecorder" includes ``pop`` (the
stack of all layers and the one copy to host arrays). The overhead is the median of the per-repeat
ratios "with / without", minus 1; the bar is 5 %. The ratio of the two minimum times is printed too:
on a loaded machine noise only adds time, so the minima are the steadier estimate.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

OVERHEAD_BAR = 0.05


def _time_interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(2):  # warm-up
        for fn in fns.values():
            fn()
    order = list(fns.items())
    for r in range(repeats):  # ABBA order: neither variant always runs first
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def bench_model(preset: str, batch: int, seq: int, repeats: int) -> dict[str, list[float]]:
    from profiler.api import load_model
    from profiler.capture import RoutingRecorder

    loaded = load_model(f"hf-config:{preset}")
    model = loaded.module
    gen = torch.Generator().manual_seed(0)
    ids_BS = torch.randint(3, 256, (batch, seq), generator=gen)
    mask_BS = torch.ones_like(ids_BS)
    valid_T = mask_BS.bool().reshape(-1)
    rec = RoutingRecorder(model, loaded.adapter)

    def plain() -> None:
        loaded.forward(model, ids_BS, mask_BS)

    def hooked() -> None:
        with rec:
            loaded.forward(model, ids_BS, mask_BS)
            rec.pop(valid_T)

    with torch.inference_mode():
        return _time_interleaved({"without hooks": plain, "with RoutingRecorder": hooked}, repeats)


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
    print(f"{'model':<18}{'variant':<22}{'median ms':>11}{'min ms':>9}{'tok/s':>10}")
    verdicts = []
    for preset in a.models.split(","):
        times = bench_model(preset, a.batch, a.seq, a.repeats)
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"{preset:<18}{name:<22}{med * 1e3:>11.2f}{min(ts) * 1e3:>9.2f}{tokens / med:>10,.0f}")
        ratios = [h / p for p, h in zip(times["without hooks"], times["with RoutingRecorder"], strict=True)]
        min_ratio = min(times["with RoutingRecorder"]) / min(times["without hooks"])
        overhead = statistics.median(ratios) - 1
        verdict = "ok" if overhead <= OVERHEAD_BAR else "OVER BAR"
        verdicts.append(
            f"{preset:<18}ratio with/without: median of pairs {statistics.median(ratios):.3f}, "
            f"of minima {min_ratio:.3f}  -> overhead {overhead:+.1%} (bar {OVERHEAD_BAR:.0%}: {verdict})"
        )
    print()
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
