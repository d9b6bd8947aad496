"""Exact ILP benchmark: backend, instance, status, objective, bound, gap, seconds (one table on stdout).

Instances: Mixtral-8x7B (32 x 8, top-2) prefill and decode traces, G = 4, one node; DeepSeek-V2-Lite dev trace
first 4 MoE layers, G = 8, with a time limit (too large to prove: shows the bound and gap).

    python benchmarks/bench_ilp.py [--balance 0.35] [--time-limit 30] [--backends cpsat,pulp]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from placement.graph import RoutingGraph, build_graph
from placement.planner import topology_cost
from placement.solvers.base import PlanSpec
from placement.solvers.ilp import solve_ilp
from placement.trace.dataset import open_trace

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


def first_layers(g: RoutingGraph, n: int) -> RoutingGraph:
    meta = replace(g.meta, layers=g.meta.layers[:n])
    return replace(g, meta=meta, load_LE=g.load_LE[:n], trans_LEE=g.trans_LEE[: n - 1],
                   coact_LEE=None if g.coact_LEE is None else g.coact_LEE[:n])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--balance", type=float, default=0.35, help="balance eps (Mixtral needs >= 0.32)")
    ap.add_argument("--time-limit", type=float, default=30.0)
    ap.add_argument("--dsv2-time-limit", type=float, default=20.0)
    ap.add_argument("--backends", default="cpsat,pulp")
    args = ap.parse_args()
    mixtral = TRACES / "mixtral-8x7b-instruct.humaneval0.npz"
    instances = [
        (f"mixtral-{part} G=4", build_graph(open_trace(f"{mixtral}:{part}")), 4, args.time_limit)
        for part in ("prefill", "decode")
    ]
    dsv2 = build_graph(open_trace(TRACES / "deepseek-v2-lite-chat.dev.npz"), with_coact=False)
    instances.append(("dsv2-lite L=4 G=8", first_layers(dsv2, 4), 8, args.dsv2_time_limit))
    header = (
        f"{'backend':<10} {'instance':<20} {'status':<16} {'objective':>12} {'bound':>12} {'gap':>8} {'seconds':>8}"
    )
    print(header)
    print("-" * len(header))
    for backend in args.backends.split(","):
        for name, g, G, limit in instances:
            spec = PlanSpec(G, balance_eps=args.balance, time_limit=limit, options={"ilp_backend": backend})
            t0 = time.perf_counter()
            res = solve_ilp(g, spec)
            wall = time.perf_counter() - t0
            if res.objective != topology_cost(res.phy2log_LP, g, spec):
                raise RuntimeError(f"{name}: objective differs from topology_cost")
            bound = "-" if res.bound is None else f"{res.bound:.0f}"
            gap = "-" if res.gap is None else f"{100 * res.gap:.2f}%"
            print(f"{backend:<10} {name:<20} {res.status:<16} {res.objective:>12.0f} {bound:>12} {gap:>8} {wall:>8.2f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
