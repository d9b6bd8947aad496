"""Plan migration in the running EP runtime: weight bytes and wall time of moving from one plan to the next.

    python benchmarks/bench_migrate.py [--ranks 8] [--tokens 1024] [--hidden 256] [--ffn 128]

DeepSeek-V2-Lite dev trace (../shared/traces), G = --ranks. Plan A: EPLB fitted on the first half of the
prompts (in trace order); plan B: EPLB or affinity fitted on the second half, as planned and with its GPUs
relabelled to A's (``placement.replan.moves.relabel_gpus``), and ``moeplace replan``'s plan from A for the second
half within the service's default move budget (10 % of the placements). Each row launches the ranks (gloo on CPU, nccl
when every rank has a GPU), replays the first --tokens tokens under A, migrates by ``move_list(A, B)`` and
replays under B. Expert weights are float32 SwiGLU experts of --hidden x --ffn (3 x hidden x ffn x 4 bytes).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from placement.graph import PROMPT_FOLDS, graph_from_routes
from placement.planner import make_plan
from placement.replan import default_budget, replan
from placement.replan.moves import move_list, relabel_gpus
from placement.runtime.launch import torch_threads
from placement.runtime.migrate import migrate_bench
from placement.runtime.replay import ModelSpec
from placement.solvers.base import PlanSpec
from placement.trace.dataset import open_trace

TRACE = Path(__file__).resolve().parents[2] / "shared" / "traces" / "deepseek-v2-lite-chat.dev.npz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--time-limit", type=float, default=10.0, help="affinity solver seconds")
    a = ap.parse_args()
    tr = open_trace(TRACE)
    routes = tr.read_all(with_gates=True)
    seqs = np.unique(routes.seq_ids_T)
    first = np.isin(routes.seq_ids_T, seqs[: seqs.size // 2])
    graphs = []
    for mask in (first, ~first):
        part = routes.take(mask)
        graphs.append(graph_from_routes(part.expert_ids_TLK, tr.meta, False, part.seq_ids_T, PROMPT_FOLDS))
    spec = PlanSpec(a.ranks, time_limit=a.time_limit)
    plan_a = make_plan(graphs[0], spec, "eplb")
    model = ModelSpec(hidden=a.hidden, ffn=a.ffn)
    nbytes = 3 * a.hidden * a.ffn * 4
    sub = routes.take(np.arange(min(a.tokens, routes.num_tokens)))
    print(
        f"DeepSeek-V2-Lite, {tr.meta.num_layers} MoE layers x {tr.meta.num_experts} experts, G = {a.ranks}, "
        f"{sub.num_tokens} tokens replayed, {nbytes:,} bytes per expert; plan A: eplb on the first half of prompts"
    )
    head = (
        f"{'plan B (second half)':<22} {'moves':>6} {'rounds':>6} {'listed MB':>10} {'sent MB':>8} {'equal':>5} "
        f"{'migrate s':>9} {'MB/s':>7} {'peak/S':>7} {'err A':>8} {'err B':>8} {'wall s':>7}"
    )
    print(head)
    rows = []
    for solver in ("eplb", "affinity"):
        plan_b = make_plan(graphs[1], spec, solver)
        rows += [(solver, plan_b), (f"{solver} relabelled", relabel_gpus(plan_a, plan_b))]
    budget = default_budget(plan_a)
    bounded = replan(plan_a, graphs[1], max_moves=budget, expert_bytes=nbytes, time_limit=a.time_limit)
    rows.append((f"replan <= {budget} moves", bounded.plan))
    for name, b in rows:
        ml = move_list(plan_a, b, nbytes)
        t0 = time.perf_counter()
        with torch_threads(1):
            rep = migrate_bench(plan_a, b, sub.expert_ids_TLK, a.ranks, moves=ml.moves, model=model)
        wall = time.perf_counter() - t0
        sent = int(rep.measured_bytes_GG.sum())
        print(
            f"{name:<22} {rep.num_moves:>6} {rep.num_rounds:>6} {ml.total_bytes / 1e6:>10.1f} {sent / 1e6:>8.1f} "
            f"{'yes' if rep.bytes_equal else 'NO':>5} {rep.seconds:>9.2f} {sent / 1e6 / rep.seconds:>7.0f} "
            f"{rep.peak_held:>3}/{rep.slots_per_gpu:<3} {rep.before.max_rel_error:>8.1e} "
            f"{rep.after.max_rel_error:>8.1e} {wall:>7.1f}"
        )


if __name__ == "__main__":
    main()
