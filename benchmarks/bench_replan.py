"""Re-planning replay: a prompt-ordered stream in windows; each policy plans on what it has seen and is scored on
the NEXT window (no peeking), moves counted between consecutive plans (../shared/METRICS.md).

    python benchmarks/bench_replan.py [--quick] [--only NAME ...] [--json OUT]
    python benchmarks/bench_replan.py --v3 [--time-limit S]     # replan's wall clock at DeepSeek-V3 size

Streams (../shared/traces is read in place, never copied):
- ds-v2-lite: DeepSeek-V2-Lite-Chat dev prompts in file order, windows of 125 prompts, G = 8 (the stream the
  defaults were chosen on).
- ds-v2-lite-rev, ds-v2-lite-seed1/2/3: the same prompts served in reverse order and in three seeded random
  orders (unseen streams for the defaults: other windows of the same kind of traffic), same windows and G.
  ds-v2-lite-seed4/5: two more, held out until the small-trace optimism's coefficient was chosen on the others
  (docs/benchmarks.md); ds-v2-lite-seed6 to 10: five more, first run after the work budgets made runs repeat
  (session 8), at the final defaults; ds-v2-lite-seed11 to 15: five more, first run in the sweep of decide's
  robustness kappa (session 8, in process); ds-v2-lite-seed16 to 20: five more, first run with the kappa set from
  the balance slack (session 9); ds-v2-lite-seed21 to 25: five more, first run at the final defaults once the
  session-9 rules had been chosen on the others; seed26 to 45 first run in the local step's sweep and seed46 to 55
  at its final defaults (session 10); seed56 to 85 first run at session 11's final defaults, seed86 to 115 at the
  same defaults in session 12.
- mixtral: Mixtral-8x7B, the prefill tokens then the decode tokens of one HumanEval problem, 4 windows of about
  55 tokens (pseudo-prompts of 8 consecutive tokens for the forecast's folds), G = 4.
- synthetic-shift: synthetic DeepSeek-V2-Lite shape (26 x 64, top-6), 8 windows of 125 prompts whose topic mix
  moves from topics 0-15 to 16-31 halfway (same model), G = 8.
- synthetic-drift: a stream the defaults were not chosen on, of another shape: 16 x 32, top-4, 12 topics with 4
  preferred experts each (more affinity), 8 windows of 100 prompts of 32 tokens whose topic mix drifts in four
  steps (topics 0-5, 3-8, 6-11, 9-11 and 0-2), G = 4.

Policies (all start from a plan fitted on the first window, scored from the second window on; ``initial_plans``):
- static: the default plan of the first window (``moeplace plan``'s), never changed.
- eplb: EPLB recomputed after every window, on all traffic so far and on the last two windows; each relabelled per
  layer to minimise moves from the deployed plan, and the better balanced on the next window is taken (an oracle
  choice: EPLB's best case). eplb-all and eplb-last2: each of the two alone (policies a deployment can run); the
  better balanced of the two over the stream is printed too (the per-stream reading of issue 13's comparator).
- affinity: the affinity optimiser (robust 2) recomputed on all traffic so far, GPUs relabelled (one renaming).
- decide: the service's policy: ``placement.replan.decide`` with its defaults on one of two memories of the
  traffic so far, decayed with half-lives of 2 windows (the service's default of 25,000 tokens on
  DeepSeek-V2-Lite) and without decay (all traffic so far), chosen online (placement/replan/memory.py).
- decide-short (only with ``--with``): the earlier default, ``decide`` on the 2-window memory alone.
- decide-calibrated (only with ``--with``; an experiment, not the default): the same with the forecast's measured
  optimism as a margin (``Calibration``: each decision's forecasts scored on the window that came next) and the
  forecast made for the next window's size (``horizon_tokens``) instead of the window's.
A policy is any callable ``(history, current_plan) -> Plan | tuple[Plan, ...]`` where ``history`` is the list of
window graphs seen so far; ``replay`` is what the service's end-to-end benchmark reuses to add its own column.
Columns: next-window imbalance_max and colocation, moves and bytes moved, decision seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from placement.graph import PROMPT_FOLDS, RoutingGraph, graph_from_routes
from placement.metrics import colocation, imbalance
from placement.plan import Plan
from placement.planner import make_plan
from placement.replan import Calibration, count_moves, decide, relabel_gpus
from placement.replan.memory import MemoryChoice, decide_on_memories
from placement.replan.solve import target_plan
from placement.solvers.affinity import work_budget
from placement.solvers.base import PlanSpec
from placement.solvers.baselines import eplb_phy2log
from placement.trace.dataset import open_trace
from placement.trace.schema import RouteArrays, TraceMeta
from placement.trace.synthetic import synthetic_trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"
Policy = Callable[[list[RoutingGraph], Plan], "Plan | tuple[Plan, ...]"]

# Expert weights (3 matrices of hidden x intermediate, bf16) of the models the streams come from.
EXPERT_BYTES = {
    "ds-v2-lite": 3 * 2048 * 1408 * 2,
    "mixtral": 3 * 4096 * 14336 * 2,
    "synthetic-shift": 3 * 2048 * 1408 * 2,
    "synthetic-drift": 3 * 2048 * 1408 * 2,
}
# the DeepSeek-V2-Lite streams: prompt order of each ("file", "reverse" or "seedN": a seeded random order)
ORDERS = {"ds-v2-lite": "file", "ds-v2-lite-rev": "reverse"}
ORDERS |= {f"ds-v2-lite-seed{i}": f"seed{i}" for i in range(1, 116)}
EXPERT_BYTES |= {name: EXPERT_BYTES["ds-v2-lite"] for name in ORDERS}
STREAMS = tuple(EXPERT_BYTES)
# the INIT's work budget (annealing moves per solve, placement/solvers/affinity.py) and the time limit it fits
# in on the shared 2-core machine with room to spare (7.5-9 s measured on one 125-prompt window): runs repeat
INIT_WORK = 4_000_000
INIT_TIME_LIMIT = 20.0


def prompt_windows(routes: RouteArrays, prompts_per_window: int, how: str = "file") -> list[RouteArrays]:
    """Consecutive windows of whole prompts, in the order the prompts first appear (``how`` = "file"), reversed
    ("reverse"), or shuffled by a seed ("seed3")."""
    seq_T = routes.seq_ids_T
    _, first = np.unique(seq_T, return_index=True)
    order = seq_T[np.sort(first)]
    if how == "reverse":
        order = order[::-1]
    elif how.startswith("seed"):
        order = np.random.default_rng(int(how[4:])).permutation(order)
    rank = np.empty(int(order.max()) + 1, dtype=np.int64)
    rank[order] = np.arange(order.size)
    win_T = rank[seq_T] // prompts_per_window
    return [routes.take(win_T == w) for w in range(int(win_T.max()) + 1)]


def merged(graphs: Sequence[RoutingGraph], weights: Sequence[float] | None = None) -> RoutingGraph:
    """Sum of window graphs, weighted (float counts) or not."""
    w_W = np.ones(len(graphs)) if weights is None else np.asarray(weights, dtype=np.float64)

    def total(arrays: list[np.ndarray]) -> np.ndarray:
        out = np.tensordot(w_W, np.stack(arrays), axes=1)
        return out.astype(np.int64) if weights is None else out

    folds = [g.fold_load_SLE for g in graphs]
    fold = None if any(f is None for f in folds) else total([f for f in folds if f is not None])
    loads, trans = total([g.load_LE for g in graphs]), total([g.trans_LEE for g in graphs])
    return RoutingGraph(graphs[0].meta, int(np.dot(w_W, [g.num_tokens for g in graphs])), loads, trans, None, fold)


def decayed(history: Sequence[RoutingGraph], half_life: float = 2.0) -> RoutingGraph:
    n = len(history)
    return merged(history, [0.5 ** ((n - 1 - k) / half_life) for k in range(n)])


def replay(
    windows: Sequence[RoutingGraph],
    policies: dict[str, Policy],
    initial: dict[str, Plan],
    expert_bytes: int,
    first: int = 2,
) -> list[dict[str, Any]]:
    """Rows (policy, window, next-window imbalance_max and colocation, moves, bytes, seconds): window w >= 1 is
    served by the plan decided after windows 0..w-1 from ``first`` on (2: the initial plan, fitted on window 0,
    serves window 1; 1: the policies decide after window 0 too). A policy returning several plans gets the best
    balanced on the next window (an oracle, for baselines only)."""
    rows = []
    for name, policy in policies.items():
        current = initial[name]
        for w in range(1, len(windows)):
            t0 = time.perf_counter()
            moves = 0
            if w >= first:
                out = policy(list(windows[:w]), current)
                options = out if isinstance(out, tuple) else (out,)
                new = min(options, key=lambda p: imbalance(p, windows[w])[1])
                moves = count_moves(current, new)
                current = new
            rows.append({
                "policy": name, "window": w, "imbalance_max": imbalance(current, windows[w])[1],
                "colocation": colocation(current, windows[w]), "moves": moves, "bytes": moves * expert_bytes,
                "seconds": time.perf_counter() - t0,
            })  # fmt: skip
    return rows


def eplb_plan(graph: RoutingGraph, like: Plan) -> Plan:
    phy = eplb_phy2log(np.asarray(graph.load_LE, dtype=np.float64), like.num_slots, like.num_gpus, like.num_nodes)
    return replace(like, phy2log=phy, provenance={"solver": "eplb"})


def policies(time_limit: float) -> dict[str, Policy]:
    def eplb(history: list[RoutingGraph], cur: Plan) -> tuple[Plan, ...]:
        fits = [merged(history), merged(history[-2:])]
        return tuple(relabel_gpus(cur, eplb_plan(g, cur), per_layer=True) for g in fits)

    def eplb_on(pick: slice) -> Policy:  # one of the two recomputes alone (a policy a deployment can run)
        return lambda history, cur: relabel_gpus(cur, eplb_plan(merged(history[pick]), cur), per_layer=True)

    def affinity(history: list[RoutingGraph], cur: Plan) -> Plan:
        return relabel_gpus(cur, target_plan(cur, merged(history), 0.1, 2.0, time_limit, 0))

    def decide_short(history: list[RoutingGraph], cur: Plan) -> Plan:
        return decide(cur, decayed(history), time_limit=time_limit).plan

    memory = [MemoryChoice()]

    def decide_policy(history: list[RoutingGraph], cur: Plan) -> Plan:
        graphs = [decayed(history), merged(history)]  # the service's two memories (LONG_HALF_LIFE 0)
        res, memory[0] = decide_on_memories(cur, graphs, memory[0], history[-1].load_LE, time_limit=time_limit)
        print(f"decide after window {len(history) - 1}: memory {res.info.get('memory', 0)}, probe scores "
              f"{memory[0].recent()}", file=sys.stderr)  # fmt: skip
        return res.plan

    calib = [Calibration()]

    def calibrated(history: list[RoutingGraph], cur: Plan) -> Plan:
        calib[0] = calib[0].scored(cur, history[-1].load_LE)  # the last decision's forecasts on the window since
        res = decide(cur, decayed(history), time_limit=time_limit, margin=calib[0].margin(),
                     horizon_tokens=history[-1].num_tokens)  # fmt: skip
        calib[0] = calib[0].after(res)
        return res.plan

    return {"static": lambda h, cur: cur, "eplb": eplb, "eplb-all": eplb_on(slice(None)),
            "eplb-last2": eplb_on(slice(-2, None)), "affinity": affinity, "decide": decide_policy,
            "decide-short": decide_short, "decide-calibrated": calibrated}  # fmt: skip


def initial_plans(first: RoutingGraph, G: int, time_limit: float) -> dict[str, Plan]:
    """The plan each policy starts from, fitted on window 0: EPLB's for ``eplb``; for the others what ``moeplace
    plan --gpus G --work INIT_WORK --time-limit INIT_TIME_LIMIT`` gives (so every run starts from the same plan)
    with its defaults (``make_plan``, the default spec: as balanced on unseen prompts as EPLB's
    forecast, then as co-located as possible), the INIT a user starts ``moeplace serve --plan INIT`` with."""
    L, E = first.load_LE.shape
    blank = Plan(G, 1, E, first.meta.layers, np.tile(np.arange(E), (L, 1)), first.meta.model_name)
    options = {"ilp_backend": "cpsat", "kappa": 0.0, **work_budget(INIT_WORK)}
    spec = PlanSpec(G, time_limit=max(time_limit, INIT_TIME_LIMIT), auto_balance=True, options=options)
    aff = make_plan(first, spec)
    fitted = {name: aff for name in ("static", "affinity", "decide", "decide-short", "decide-calibrated")}
    return {name: eplb_plan(first, blank) for name in ("eplb", "eplb-all", "eplb-last2")} | fitted


def topic_stream(
    shape: tuple[int, int, int],
    mixes: list[np.ndarray],
    windows_per_mix: int,
    prompts: int,
    tokens_per_prompt: int,
    **kw: Any,
) -> tuple[TraceMeta, list[RouteArrays]]:
    """A synthetic model (one seed: same popularity and preferred experts) under a topic mix that changes every
    ``windows_per_mix`` windows of ``prompts`` prompts."""
    L, E, K = shape
    wins: list[RouteArrays] = []
    for i, mix in enumerate(mixes):
        T = windows_per_mix * prompts * tokens_per_prompt
        meta, r = synthetic_trace(L, E, K, T, num_topics=mix.size, tokens_per_prompt=tokens_per_prompt, seed=7,
                                  topic_probs=mix / mix.sum(), **kw)  # fmt: skip
        seq_T = r.seq_ids_T + i * len(mixes) * windows_per_mix * prompts
        wins += prompt_windows(RouteArrays(r.expert_ids_TLK, seq_T, r.token_pos_T), prompts)
    return meta, wins


def stream_routes(quick: bool) -> dict[str, tuple[TraceMeta, list[RouteArrays], int]]:
    """Every stream as routes per window: (meta, windows, G); quick: 4 windows each."""
    out: dict[str, tuple[TraceMeta, list[RouteArrays], int]] = {}
    if (SHARED / "README.md").exists():
        tr = open_trace(SHARED / "deepseek-v2-lite-chat.dev.npz")
        routes = tr.read_all(with_gates=False)
        for name, how in ORDERS.items():
            wins = prompt_windows(routes, 125, how)
            out[name] = (tr.meta, wins[:4] if quick else wins, 8)
        parts = [open_trace(f"{SHARED / 'mixtral-8x7b-instruct.humaneval0.npz'}:{a}") for a in ("prefill", "decode")]
        ids = np.concatenate([p.read_all(with_gates=False).expert_ids_TLK for p in parts])
        T = ids.shape[0]
        seq = (np.arange(T) // 8).astype(np.int64)  # pseudo-prompts of 8 tokens for the folds
        routes = RouteArrays(ids, seq, np.zeros(T, np.int32))
        out["mixtral"] = (parts[0].meta, prompt_windows(routes, -(-T // 8 // 4)), 4)
    else:
        print(f"note: {SHARED} not found; only the synthetic streams run", file=sys.stderr)
    n = 2 if quick else 4
    halves = [np.r_[np.full(16, 1.0), np.zeros(16)], np.r_[np.zeros(16), np.full(16, 1.0)]]
    out["synthetic-shift"] = (*topic_stream((26, 64, 6), halves, n, 125, 64, model_name="synthetic-v2-lite"), 8)
    steps = [np.roll(np.r_[np.full(6, 1.0), np.zeros(6)], 3 * i) for i in range(4)]
    drift = topic_stream((16, 32, 4), steps[: 2 if quick else 4], 2, 100, 32, num_preferred=4, follow=0.8,
                         model_name="synthetic-drift")  # fmt: skip
    out["synthetic-drift"] = (*drift, 4)
    return out


def streams(quick: bool, only: Sequence[str] | None = None) -> dict[str, tuple[list[RoutingGraph], int]]:
    """``stream_routes`` as window graphs: (graphs, G); ``only``: these stream names."""
    return {
        name: ([graph_from_routes(w.expert_ids_TLK, meta, False, w.seq_ids_T, PROMPT_FOLDS) for w in wins], G)
        for name, (meta, wins, G) in stream_routes(quick).items()
        if not only or name in only
    }


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in dict.fromkeys(r["policy"] for r in rows):
        rs = [r for r in rows if r["policy"] == name]
        out.append({
            "policy": name, "imbalance_max": float(np.mean([r["imbalance_max"] for r in rs])),
            "colocation": float(np.mean([r["colocation"] for r in rs])), "moves": sum(r["moves"] for r in rs),
            "bytes": sum(r["bytes"] for r in rs), "seconds": float(np.mean([r["seconds"] for r in rs])),
        })  # fmt: skip
    return out


# issue 13's bar against EPLB recompute: colocation at least this multiple of its, moves at most this share of its
BAR_COLOCATION, BAR_MOVES = 1.6, 0.3


def eplb_per_stream(summ: list[dict[str, Any]]) -> dict[str, Any] | None:
    """EPLB recompute's better balanced policy over the stream (eplb-all or eplb-last2; ``summarise`` rows), None
    without both."""
    alone = [s for s in summ if s["policy"] in ("eplb-all", "eplb-last2")]
    return min(alone, key=lambda s: s["imbalance_max"]) if len(alone) == 2 else None


def bar_check(summ: list[dict[str, Any]]) -> dict[str, dict[str, bool]]:
    """Per policy other than EPLB's (``summarise`` rows): does it meet issue 13's bar? ``imbalance``: mean
    imbalance_max <= EPLB recompute's better policy over the stream (eplb-all or eplb-last2: per stream);
    ``imbalance_oracle``: <= the per-window oracle (eplb); ``colocation``: >= BAR_COLOCATION x eplb's;
    ``moves``: <= BAR_MOVES x eplb's. Empty without the three EPLB rows."""
    oracle = next((s for s in summ if s["policy"] == "eplb"), None)
    best = eplb_per_stream(summ)
    if oracle is None or best is None:
        return {}
    per_stream = best["imbalance_max"]
    return {
        s["policy"]: {
            "imbalance": s["imbalance_max"] <= per_stream,
            "imbalance_oracle": s["imbalance_max"] <= oracle["imbalance_max"],
            "colocation": s["colocation"] >= BAR_COLOCATION * oracle["colocation"],
            "moves": s["moves"] <= BAR_MOVES * oracle["moves"],
        }
        for s in summ
        if not s["policy"].startswith("eplb") and s["policy"] != "static"
    }


def print_stream(name: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n== {name}: per window (scored on the next window)")
    print(f"{'policy':<10} {'win':>3} {'imb_max':>8} {'coloc':>7} {'moves':>6} {'GB moved':>9} {'dec s':>6}")
    for r in rows:
        print(f"{r['policy']:<10} {r['window']:>3} {r['imbalance_max']:>8.4f} {r['colocation']:>7.4f} "
              f"{r['moves']:>6} {r['bytes'] / 1e9:>9.2f} {r['seconds']:>6.2f}")  # fmt: skip
    summ = summarise(rows)
    eplb = next((s for s in summ if s["policy"] == "eplb"), None)
    best = eplb_per_stream(summ)
    if best is not None:
        print(f"-- {name}: EPLB recompute, the better balanced of its two policies over the stream: {best['policy']} "
              f"{best['imbalance_max']:.4f} (the per-window oracle, eplb: "
              f"{eplb['imbalance_max'] if eplb else float('nan'):.4f})")  # fmt: skip
    print(f"-- {name}: totals (mean imbalance_max and colocation, total moves and bytes, mean decision s)")
    for s in summ:
        rel = ""
        if eplb is not None and eplb["colocation"] > 0:
            ratio, share = s["colocation"] / eplb["colocation"], s["moves"] / max(eplb["moves"], 1)
            rel = f"  coloc x{ratio:.2f} vs eplb, moves {share:.0%} of eplb's"
        print(f"{s['policy']:<10} {s['imbalance_max']:>8.4f} {s['colocation']:>7.4f} {s['moves']:>6} "
              f"{s['bytes'] / 1e9:>9.2f} {s['seconds']:>6.2f}{rel}")  # fmt: skip
    for policy, ok in bar_check(summ).items():
        marks = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in ok.items())
        verdict = "met" if ok["imbalance"] and ok["colocation"] and ok["moves"] else "not met"
        print(f"-- {name}: issue 13's bar for {policy} (per stream): {verdict} [{marks}]")


def bench_v3(time_limit: float, max_moves: int = 800) -> None:
    """``replan`` at DeepSeek-V3 size (58 x 256, top-8, G = 32 on 4 nodes, 32 redundant slots) from EPLB's plan for
    another synthetic topic mix: wall seconds against the time limit, and what the target plan did."""
    from placement.replan import replan

    L, E, G, N, R = 58, 256, 32, 4, 32
    mixes = [np.r_[np.ones(16), np.zeros(16)], np.r_[np.zeros(16), np.ones(16)]]
    meta, wins = topic_stream((L, E, 8), mixes, 1, 200, 50, model_name="dsv3-shape")
    old, new = (graph_from_routes(w.expert_ids_TLK, meta, False, w.seq_ids_T, PROMPT_FOLDS) for w in wins)
    blank = Plan(G, N, E, meta.layers, np.tile(np.arange(E), (L, 1)), meta.model_name)
    cur = replace(blank, phy2log=eplb_phy2log(old.load_LE.astype(np.float64), E + R, G, N))
    t0 = time.perf_counter()
    res = replan(cur, new, max_moves=max_moves, time_limit=time_limit)
    wall = time.perf_counter() - t0
    chosen = res.plan.provenance.get("replan", {}).get("chosen", "current")
    print(f"replan {L} x {E} top-8, G = {G} on {N} nodes, +{R} slots, {new.num_tokens:,} tokens, budget {max_moves}: "
          f"{wall:.1f} s wall for a {time_limit:g} s limit; chose {chosen} ({count_moves(cur, res.plan)} moves, "
          f"forecast {res.before['forecast_imbalance']:.3f} -> {res.after['forecast_imbalance']:.3f}); "
          f"target: {res.info.get('target', 'ready')}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: 3 windows per stream, short time limits")
    ap.add_argument("--only", nargs="*", help=f"stream names to run ({', '.join(STREAMS)})")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds per plan (default 10, quick 2)")
    ap.add_argument("--with", dest="pols", nargs="*",
                    default=["static", "eplb", "eplb-all", "eplb-last2", "affinity", "decide"],
                    help="policies to run (also: decide-short, decide-calibrated)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="write all rows as JSON")
    ap.add_argument("--v3", action="store_true", help="time replan at DeepSeek-V3 size instead (default limit 20 s)")
    args = ap.parse_args(argv)
    if args.v3:
        bench_v3(args.time_limit or 20.0)
        return
    tl = args.time_limit or (2.0 if args.quick else 10.0)
    everything: dict[str, Any] = {}
    for name, (wins, G) in streams(args.quick, args.only).items():
        pols = {k: v for k, v in policies(tl).items() if k in args.pols}
        rows = replay(wins, pols, initial_plans(wins[0], G, tl), EXPERT_BYTES[name])
        print_stream(name, rows)
        everything[name] = {"rows": rows, "summary": summarise(rows)}
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
