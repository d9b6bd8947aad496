"""Predicted step time (placement/timemodel.py) of contiguous, eplb, the affinity default and ``--objective time``.

    python benchmarks/bench_time.py [--quick] [--only ds-v2-lite|dsv3] [--hardware PRESET]

Every plan is fitted on a seeded half of the prompts; its time is predicted on the other half (``predict_time``
on the held-out graph, scaled to one step of 4096 tokens per GPU). ``--objective time`` chooses its plan on the
fitted half alone (the forecast of unseen steps from the prompt folds).
- ds-v2-lite: DeepSeek-V2-Lite-Chat dev trace (26 x 64, top-6; hidden 2048, expert FFN 1408), G = 8 on one
  node, R = 0 and 8 (../shared/traces, read in place).
- dsv3: synthetic DeepSeek-V3 shape (58 x 256, top-8; hidden 7168, expert FFN 2048), 32 GPUs on 4 nodes, +32.
Columns: held-out colocation and imbalance_max (../shared/METRICS.md), predicted per-layer mean and max and
step total in ms (compute + all-to-all), the all-to-all part, the time limit, the solver's seconds and the wall
seconds of ``make_plan`` (the solver plus the planner's cost, bound and forecast), and for ``--objective time`` the
candidate it chose and those it skipped or stopped (one time limit covers them all).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from placement.graph import graph_from_routes
from placement.metrics import evaluate
from placement.planner import make_plan
from placement.solvers.base import PlanSpec
from placement.timemodel import ModelDims, load_hardware, predict_time, resolve_dims
from placement.trace.dataset import open_trace
from placement.trace.schema import RouteArrays, TraceMeta, split_by_prompt
from placement.trace.synthetic import synthetic_trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
CASES = ("contiguous", "eplb", "affinity default", "objective time")


def run(
    name: str, meta: TraceMeta, r: RouteArrays, G: int, N: int, R: int, limit: float, hw_name: str
) -> list[dict[str, Any]]:
    m = split_by_prompt(r.seq_ids_T, 0.5, seed=0)
    fit, test = r.take(m), r.take(~m)
    g_fit = graph_from_routes(fit.expert_ids_TLK, meta, with_coact=False, seq_ids_T=fit.seq_ids_T)
    g_test = graph_from_routes(test.expert_ids_TLK, meta, with_coact=False)
    hw, dims = load_hardware(hw_name), resolve_dims(meta)
    dims = ModelDims(dims.hidden_size, dims.expert_ffn_size, None, dims.bytes_per_element, dims.source)
    rows = []
    for case in CASES:
        opts: dict[str, Any] = {}
        if case == "objective time":
            opts = {"objective": "time", "hardware": hw.to_json(), "model_dims": dims.to_json()}
        solver = case if case in ("contiguous", "eplb") else "auto"
        spec = PlanSpec(G, N, R, time_limit=limit, seed=0, auto_balance=case != "contiguous", options=opts)
        t0 = time.perf_counter()
        plan = make_plan(g_fit, spec, solver)
        wall = time.perf_counter() - t0
        ev = evaluate(plan, g_test)
        t = predict_time(plan, g_test, hw, dims).summary()
        info = plan.provenance.get("info") or {}
        row = {
            "instance": name,
            "G": G,
            "N": N,
            "R": R,
            "plan": case,
            "test_coloc": ev["colocation"],
            "test_imb": ev["imbalance_max"],
            **t,
            "limit_s": limit,
            "solve_s": plan.provenance["solve_seconds"],
            "wall_s": wall,
            "chose": info.get("time_choice", ""),
            "skipped": ", ".join(f"{k['name']} ({k['why']})" for k in info.get("time_skipped", [])),
        }
        rows.append(row)
        print_row(row)
    return rows


def print_row(r: dict[str, Any]) -> None:
    print(
        f"| {r['instance']} | {r['G']} | {r['N']} | {r['R']} | {r['plan']} | {r['test_coloc']:.3f} | "
        f"{r['test_imb']:.3f} | {r['layer_mean_s'] * 1e3:.3f} | {r['layer_max_s'] * 1e3:.3f} | "
        f"{r['step_s'] * 1e3:.2f} | {r['comm_s'] * 1e3:.2f} | {r['limit_s']:.0f} | {r['solve_s']:.1f} | "
        f"{r['wall_s']:.1f} | {r['chose']} | {r['skipped']} |",
        flush=True,
    )


def ds_v2_lite(quick: bool, hw: str) -> list[dict[str, Any]]:
    tr = open_trace(SHARED / "deepseek-v2-lite-chat.dev.npz")
    r = tr.read_all(with_gates=False)
    return [row for R in ((0,) if quick else (0, 8)) for row in run("ds-v2-lite", tr.meta, r, 8, 1, R, 10.0, hw)]


def dsv3(quick: bool, hw: str) -> list[dict[str, Any]]:
    meta, r = synthetic_trace(58, 256, 8, 16384 if quick else 65536, seed=0, model_name="deepseek-v3-synthetic")
    return run("dsv3", meta, r, 32, 4, 32, 10.0 if quick else 20.0, hw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller instances")
    ap.add_argument("--only", choices=("ds-v2-lite", "dsv3"), help="run one instance")
    ap.add_argument("--hardware", default="h100-nvlink-ib400", help="preset name or HardwarePreset JSON")
    args = ap.parse_args(argv)
    print(
        "| instance | G | N | R | plan | test coloc | test imb | layer mean ms | layer max ms | step ms | "
        "all-to-all ms | limit s | solve s | wall s | chose | skipped |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    if args.only in (None, "ds-v2-lite"):
        if (SHARED / "deepseek-v2-lite-chat.dev.npz").exists():
            ds_v2_lite(args.quick, args.hardware)
        else:
            print(f"(skipped ds-v2-lite: {SHARED} not found)")
    if args.only in (None, "dsv3"):
        dsv3(args.quick, args.hardware)
    return 0


if __name__ == "__main__":
    sys.exit(main())
