"""EP runtime benchmark: an optimised plan vs contiguous placement, measured on real process groups.

DeepSeek-V2-Lite routing (../shared/traces/deepseek-v2-lite-chat.dev.npz) is split by prompt; the plans are
fitted on the training half and the held-out prompts are replayed through R ranks (gloo on CPU, nccl when
CUDA is there) with random SwiGLU experts of reduced size (hidden 256, ffn 176 keeps DeepSeek-V2-Lite's
ffn/hidden ratio 1408/2048). One launch runs every plan and mode; the table gives cross-rank bytes and wall
time per layer, and their ratios optimised / contiguous. Measured bytes are checked against the evaluator.

A second table runs the shipped demo model live (placement/runtime/live.py): plans fitted on the routing of
builtin prompts N .. 3N-1, prompts 0 .. N-1 (N = ``--live-prompts``) run through the ranks with live routing;
logits are checked against the single-process model (``--live-prompts 0``: skip).

    python benchmarks/bench_ep.py [--solver affinity] [--ranks 4] [--tokens 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from placement.graph import graph_from_routes
from placement.metrics import MODES, colocation, imbalance
from placement.planner import SOLVER_NAMES, make_plan
from placement.runtime.launch import JobReport, LiveReport, ep_bench, live_bench, pick_backend, torch_threads
from placement.runtime.live import LiveJob, make_batches, reference_run
from placement.runtime.replay import EPJob, ModelSpec
from placement.solvers.base import PlanSpec
from placement.trace.dataset import open_trace
from placement.trace.schema import split_by_prompt

DEFAULT_TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "deepseek-v2-lite-chat.dev.npz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--solver", default="affinity", choices=SOLVER_NAMES, help="solver of the optimised plan")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--redundant", type=int, default=0, help="redundant slots per layer of the optimised plan")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens to replay (first N)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=176)
    ap.add_argument("--repeats", type=int, default=3, help="runs per job; times are medians")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--live-prompts", type=int, default=16, help="demo-model prompts run live (0: skip)")
    ap.add_argument("--live-max-len", type=int, default=256, help="tokens per live prompt at most")
    ap.add_argument("--json", type=Path, default=None, help="also write the reports here")
    return ap.parse_args(argv)


def row(rep: JobReport, base: JobReport | None) -> str:
    ms = rep.layer_seconds_L.mean() * 1e3
    d, c, b = rep.phase_seconds_3 * 1e3 / rep.layer_seconds_L.size
    mb = rep.cross_rank_bytes / 1e6
    ratio = ""
    if base is not None:
        ratio = f"{rep.cross_rank_bytes / base.cross_rank_bytes:>7.3f} {ms / (base.layer_seconds_L.mean() * 1e3):>7.3f}"
    return (
        f"{rep.name:<24} {mb:>10.2f} {'yes' if rep.bytes_equal else 'NO':>6} {ms:>9.2f} "
        f"{d:>7.2f} {c:>7.2f} {b:>7.2f} {rep.max_rel_error:>9.1e} {ratio}"
    )


def live_demo(args: argparse.Namespace) -> list[LiveReport]:
    """The demo model live: contiguous vs the optimised plan, fitted on other builtin prompts."""
    from profiler.api import load_model, load_prompts

    loaded = load_model("builtin")
    prompts = load_prompts("builtin")
    n = args.live_prompts
    encoded = [loaded.tokenizer(p)[: args.live_max_len] for p in prompts[n : 3 * n]]
    with torch_threads(1):
        fit_TLK = reference_run(loaded, make_batches(encoded, 8, loaded.pad_id))[1]
    graph = graph_from_routes(fit_TLK, loaded.trace_meta())
    plans = {
        "contiguous": make_plan(graph, PlanSpec(args.ranks), "contiguous"),
        args.solver: make_plan(graph, PlanSpec(args.ranks, num_redundant=args.redundant, seed=args.seed), args.solver),
    }
    modes = tuple(m for m in args.modes.split(",") if m)
    jobs = [LiveJob(f"demo-{name}/{m}", p, m) for m in modes for name, p in plans.items()]
    with torch_threads(1):
        return live_bench("builtin", jobs, args.ranks, prompts[:n], max_len=args.live_max_len, repeats=args.repeats)


def print_table(reports: list[JobReport], prefix: str = "") -> None:
    """One row per report; ratios against the ``{prefix}contiguous`` report of the same mode."""
    print(
        f"{'plan/mode':<24} {'cross MB':>10} {'=pred':>6} {'ms/layer':>9} {'disp':>7} {'comp':>7} {'comb':>7} "
        f"{'rel.err':>9} {'bytes x':>7} {'time x':>7}"
    )
    by_name = {r.name: r for r in reports}
    for rep in reports:
        base = f"{prefix}contiguous/{rep.mode}"
        print(row(rep, by_name[base] if rep.name != base else None))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tr = open_trace(args.trace)
    routes = tr.read_all()
    train_T = split_by_prompt(routes.seq_ids_T, 0.5, args.seed)
    train, held = routes.take(train_T), routes.take(~train_T)
    held = held.take(np.arange(min(args.tokens, held.num_tokens)))
    graph = graph_from_routes(train.expert_ids_TLK, tr.meta)
    t0 = time.perf_counter()
    plans = {
        "contiguous": make_plan(graph, PlanSpec(args.ranks), "contiguous"),
        args.solver: make_plan(graph, PlanSpec(args.ranks, num_redundant=args.redundant, seed=args.seed), args.solver),
    }
    solve_s = time.perf_counter() - t0
    held_graph = graph_from_routes(held.expert_ids_TLK, tr.meta)
    modes = tuple(m for m in args.modes.split(",") if m)
    jobs = [
        EPJob(f"{name}/{m}", p, m, held.expert_ids_TLK, held.gate_weights_TLK)
        for m in modes
        for name, p in plans.items()
    ]
    model = ModelSpec(hidden=args.hidden, ffn=args.ffn, seed=args.seed)
    backend = pick_backend(args.backend, args.ranks)
    t0 = time.perf_counter()
    with torch_threads(1):
        reports = ep_bench(jobs, args.ranks, model, backend=backend, repeats=args.repeats)
    wall = time.perf_counter() - t0

    print(
        f"trace {Path(args.trace).name}: {routes.num_tokens:,} tokens; plans fitted on {int(train_T.sum()):,} "
        f"training-prompt tokens (solve {solve_s:.1f} s); replaying {held.num_tokens:,} held-out tokens x "
        f"{held.expert_ids_TLK.shape[1]} MoE layers on {args.ranks} {backend} ranks, hidden {args.hidden}, "
        f"ffn {args.ffn}, {args.repeats} repeats (run {wall:.0f} s)"
    )
    for name, p in plans.items():
        _, imb_max, imb_mean = imbalance(p, held_graph)
        print(
            f"  {name:<12} held-out colocation {colocation(p, held_graph):.3f}, "
            f"imbalance max {imb_max:.3f} mean {imb_mean:.3f}"
        )
    print()
    print_table(reports)
    print("(ms/layer: slowest rank per layer, median of repeats, mean over layers; disp/comp/comb: its phases;")
    print(" bytes x, time x: optimised / contiguous in the same mode)")
    live: list[LiveReport] = []
    if args.live_prompts > 0:
        t0 = time.perf_counter()
        live = live_demo(args)
        wall = time.perf_counter() - t0
        first = live[0].job
        print(
            f"\ndemo model live: {live[0].num_prompts} builtin prompts, {first.num_tokens:,} tokens x "
            f"{first.measured_L2GG.shape[0]} MoE layers, hidden 128, live routing (run {wall:.0f} s); "
            "rel.err: logits vs the single-process model"
        )
        print_table([r.job for r in live], prefix="demo-")
        for r in live:
            print(
                f"  {r.job.name:<22} all-gather for attention {r.gather_bytes / 1e6:.2f} MB, "
                f"{r.gather_seconds_L.mean() * 1e3:.2f} ms/layer; routing mismatches {r.routing_mismatch}"
            )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "reports": [r.to_dict() for r in reports],
                    "live": [r.to_dict() for r in live],
                },
                indent=1,
            )
        )
    ok = all(r.bytes_equal and r.max_rel_error <= 1e-5 for r in [*reports, *(r.job for r in live)])
    return 0 if ok and all(r.routing_mismatch == 0 for r in live) else 1


if __name__ == "__main__":
    sys.exit(main())
