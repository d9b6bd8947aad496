"""Routing-capture overhead on the shipped demo MoE: forward with RoutingRecorder vs. without.

    python -m benchmarks.bench_hooks [--batch 8] [--seq 256] [--repeats 10] [--threads 2]

Batches are builtin prompts (cycled, cut/padded to --seq bytes). The two variants are interleaved
per repeat so drift (thermal, other load) hits both; the table reports median and min times and
the median ratio "with hooks / without" (capture includes the per-forward copy to host arrays).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _batch(prompts: list[str], batch: int, seq: int) -> torch.Tensor:
    ids_BS = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        data = (prompts[b % len(prompts)] * (seq // 16 + 1)).encode()[:seq]
        ids_BS[b] = torch.tensor(list(data))
    return ids_BS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from profiler.api import load_model, load_prompts
    from profiler.capture import RoutingRecorder

    torch.set_num_threads(a.threads)
    loaded = load_model("builtin")
    model = loaded.module
    ids_BS = _batch(load_prompts("builtin"), a.batch, a.seq)
    valid_T = torch.ones(a.batch * a.seq, dtype=torch.bool)

    def plain() -> None:
        loaded.forward(model, ids_BS, valid_T.view(a.batch, a.seq))

    rec = RoutingRecorder(model, loaded.adapter)

    def hooked() -> None:
        with rec:
            loaded.forward(model, ids_BS, valid_T.view(a.batch, a.seq))
            rec.pop(valid_T)

    times: dict[str, list[float]] = {"without hooks": [], "with RoutingRecorder": []}
    with torch.inference_mode():
        for fn in (plain, hooked, plain, hooked):  # warm-up
            fn()
        for _ in range(a.repeats):
            for name, fn in (("without hooks", plain), ("with RoutingRecorder", hooked)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)

    tokens = a.batch * a.seq
    print(f"demo MoE, batch {a.batch} x {a.seq} tokens, {a.repeats} interleaved repeats, {a.threads} threads")
    print(f"{'variant':<22}{'median ms':>11}{'min ms':>9}{'tok/s':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<22}{med * 1e3:>11.2f}{min(ts) * 1e3:>9.2f}{tokens / med:>10,.0f}")
    ratios = [h / p for p, h in zip(times["without hooks"], times["with RoutingRecorder"], strict=True)]
    print(f"ratio with/without: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}")


if __name__ == "__main__":
    main()
