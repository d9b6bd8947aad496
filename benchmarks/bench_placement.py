"""Placement benchmark: every solver on real and synthetic traces, fitted on some prompts, evaluated on others.

    python benchmarks/bench_placement.py [--quick] [--only NAME ...] [--json OUT]

Instances (../shared/traces is read in place, never copied):
- ds-v2-lite: DeepSeek-V2-Lite-Chat dev trace (26 x 64, top-6), fitted on a seeded half of the prompts,
  evaluated on the other half; G = 4, 8, 16; redundant 0 and 8 (16 for G = 16, since slots must divide over GPUs).
- ds-v2-lite-seeds: G = 8, R = 0, half splits with 10 seeds: eplb, affinity, --robust 1 and --unseen; spread of
  held-out colocation and imbalance, and coverage of the plan's unseen-imbalance forecast.
- ds-v2-lite-cv: as ds-v2-lite, fitted on 80% of the prompts and evaluated on the other 20%, 5 seeds (the closest to
  "fitted on the whole dev file, evaluated on unseen prompts").
- mixtral: Mixtral-8x7B (32 x 8, top-2), fitted on the prefill tokens, evaluated on the decode tokens; G = 4.
- dsv3: synthetic DeepSeek-V3 shape (58 x 256, top-8), 32 GPUs on 4 nodes, 32 redundant slots.
- kimi-k2: synthetic Kimi-K2 shape (60 x 384, top-8), 64 GPUs on 8 nodes.
- v2-lite-frontier: colocation against unseen imbalance_max of eplb, the affinity default (no --balance),
  --unseen --balance 0.08 and --robust 1 --balance 0.1, over several half splits (mean, median, min, max);
  G = 4, 8, 16 and R = 0, 8, 16 (G = 16: R = 0, 16).
- v2-lite-kfold: G = 8, R = 0 and 8: eplb and the affinity default over 5 prompt folds, 3 seeded shuffles
  (fitted on 80 % of the prompts, tested on the other 20 %); the default's held-out imbalance_max against
  eplb's, fold by fold.
- skewed-top1: synthetic top-1 model, 128 experts, one layer sending 99.9 % of its tokens to one expert; G = 8,
  8 redundant slots; eplb beside the default over 6 half splits, and the default's held-out imbalance_max and
  colocation against eplb's split by split.
- dsv3-weak: DeepSeek-V3 shape with weakly dependent layers, 32 GPUs / 4 nodes, 32 redundant; eplb beside the
  default.
For the synthetic shapes affinity gets --balance equal to what eplb achieves, so it is compared at equal or
better imbalance. Columns: colocation and imbalance_max (../shared/METRICS.md) on the fit and held-out tokens,
the plan's forecast of held-out imbalance_max (median / 90th percentile, from the fitted prompts alone),
home-model all-to-all bytes per held-out token (hidden 4096, bf16), solve seconds, status, gap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from placement.graph import graph_from_routes, graph_stats
from placement.metrics import evaluate
from placement.planner import make_plan
from placement.solvers.base import PlanSpec
from placement.trace.dataset import open_trace
from placement.trace.schema import RouteArrays, TraceMeta, split_by_prompt
from placement.trace.synthetic import skewed_top1_trace, synthetic_trace

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "traces"


def run_case(
    name: str,
    meta: TraceMeta,
    fit: RouteArrays,
    test: RouteArrays,
    spec: PlanSpec,
    solver: str,
    traffic: bool = True,
) -> dict[str, Any]:
    g_fit = graph_from_routes(fit.expert_ids_TLK, meta, with_coact=False, seq_ids_T=fit.seq_ids_T)
    g_test = graph_from_routes(test.expert_ids_TLK, meta, with_coact=False)
    plan = make_plan(g_fit, spec, solver)
    a = evaluate(plan, g_fit)
    b = evaluate(plan, g_test, test if traffic else None)
    pv = plan.provenance
    fc = pv.get("unseen_imbalance") or {}
    return {
        "instance": name,
        "G": spec.num_gpus,
        "N": spec.num_nodes,
        "R": spec.num_redundant,
        "eps": None if spec.auto_balance else spec.balance_eps,
        "solver": pv["solver"],
        "fit_coloc": a["colocation"],
        "fit_imb": a["imbalance_max"],
        "test_coloc": b["colocation"],
        "test_imb": b["imbalance_max"],
        "fcst_p10": fc.get("p10"),
        "fcst_p50": fc.get("p50"),
        "fcst_p90": fc.get("p90"),
        "home_B_tok": b["home"]["bytes_per_token"] if traffic else None,
        "solve_s": pv["solve_seconds"],
        "status": pv["status"],
        "gap": pv["gap"],
    }


def ds_v2_lite(quick: bool) -> list[dict[str, Any]]:
    tr = open_trace(SHARED / "deepseek-v2-lite-chat.dev.npz")
    r = tr.read_all(with_gates=False)
    m = split_by_prompt(r.seq_ids_T, 0.5, seed=0)
    fit, test = r.take(m), r.take(~m)
    rows = []
    for G in (8,) if quick else (4, 8, 16):
        for R in (0, 8 if 72 % G == 0 else G):
            eps = 0.1 if R == 0 else 0.03
            for solver in ("contiguous", "round_robin", "eplb", "affinity"):
                spec = PlanSpec(G, 1, R, eps, time_limit=10.0, seed=0)
                rows.append(run_case("ds-v2-lite", tr.meta, fit, test, spec, solver))
                print_row(rows[-1])
    if not quick:
        spec = PlanSpec(8, 1, 0, 0.1, time_limit=30.0, options={"ilp_backend": "cpsat"})
        rows.append(run_case("ds-v2-lite", tr.meta, fit, test, spec, "ilp"))
        print_row(rows[-1])
    return rows


def ds_v2_lite_seeds(quick: bool) -> list[dict[str, Any]]:
    """Half splits over many seeds, G = 8, R = 0: how held-out colocation and imbalance vary with the prompts
    drawn, and whether the plan's unseen-imbalance forecast (p10-p90) brackets what happens."""
    tr = open_trace(SHARED / "deepseek-v2-lite-chat.dev.npz")
    r = tr.read_all(with_gates=False)
    cases: tuple[tuple[str, str, dict[str, Any], float], ...] = (
        ("eplb", "eplb", {}, 10.0),
        ("affinity", "affinity", {}, 10.0),
        ("affinity --robust 1", "affinity", {"kappa": 1.0}, 10.0),
        ("affinity --unseen", "affinity", {"unseen": True}, 25.0),
    )
    rows: list[dict[str, Any]] = []
    for seed in range(3 if quick else 10):
        m = split_by_prompt(r.seq_ids_T, 0.5, seed=seed)
        for label, solver, opts, limit in cases:
            spec = PlanSpec(8, 1, 0, 0.1, time_limit=limit, seed=0, options=opts)
            rows.append(run_case(f"ds-v2-lite-s{seed}", tr.meta, r.take(m), r.take(~m), spec, solver, False))
            rows[-1]["label"] = label
            print_row(rows[-1])
    for label, *_ in cases:
        sel = [x for x in rows if x["label"] == label]
        imb = np.array([x["test_imb"] for x in sel])
        inside = np.mean([x["fcst_p10"] <= x["test_imb"] <= x["fcst_p90"] for x in sel])
        below = np.mean([x["test_imb"] <= x["fcst_p50"] for x in sel])
        print(
            f"  {label} over {len(sel)} splits: test colocation "
            f"{np.mean([x['test_coloc'] for x in sel]):.4f} (min {min(x['test_coloc'] for x in sel):.4f}), "
            f"test imbalance median {np.median(imb):.3f}, <= 1.10 in {np.mean(imb <= 1.10):.0%}; "
            f"forecast p10-p90 holds it in {inside:.0%}, p50 above it in {below:.0%}"
        )
    # A pure balancer on many more splits (eplb takes milliseconds): how often is held-out imbalance <= 1.10?
    for frac in (0.5, 0.8):
        test_imb = []
        for seed in range(40):
            m = split_by_prompt(r.seq_ids_T, frac, seed=seed)
            g_fit, g_test = (graph_from_routes(r.take(x).expert_ids_TLK, tr.meta, with_coact=False) for x in (m, ~m))
            plan = make_plan(g_fit, PlanSpec(8, 1, 0, 0.1), "eplb")
            test_imb.append(evaluate(plan, g_test)["imbalance_max"])
        print(
            f"  eplb over 40 splits fitted on {frac:.0%}: test imbalance median {np.median(test_imb):.3f}, "
            f"<= 1.10 in {np.mean(np.array(test_imb) <= 1.10):.0%}"
        )
    return rows


def ds_v2_lite_cv(quick: bool) -> list[dict[str, Any]]:
    tr = open_trace(SHARED / "deepseek-v2-lite-chat.dev.npz")
    r = tr.read_all(with_gates=False)
    rows = []
    for seed in range(2 if quick else 5):
        m = split_by_prompt(r.seq_ids_T, 0.8, seed=seed)
        for R, eps in ((0, 0.1), (8, 0.03)):
            spec = PlanSpec(8, 1, R, eps, time_limit=10.0, seed=0)
            row = run_case(f"ds-v2-lite-cv{seed}", tr.meta, r.take(m), r.take(~m), spec, "affinity")
            rows.append(row)
            print_row(row)
    for R in (0, 8):
        sel = [x for x in rows if x["R"] == R]
        print(
            f"  cv mean R={R}: test colocation {np.mean([x['test_coloc'] for x in sel]):.4f}, "
            f"fit imbalance max {max(x['fit_imb'] for x in sel):.3f}, "
            f"test imbalance mean {np.mean([x['test_imb'] for x in sel]):.3f}"
        )
    return rows


def mixtral(quick: bool) -> list[dict[str, Any]]:
    path = SHARED / "mixtral-8x7b-instruct.humaneval0.npz"
    pre, dec = open_trace(f"{path}:prefill"), open_trace(f"{path}:decode")
    rows: list[dict[str, Any]] = []
    for solver, backend in (("contiguous", ""), ("eplb", ""), ("affinity", ""), ("ilp", "cpsat"), ("ilp", "pulp")):
        # 135 tokens, 2 experts per GPU: no placement is within 10% of the mean; allow what eplb reaches.
        eps = 0.1 if len(rows) < 2 else round(rows[1]["fit_imb"] - 1.0 + 0.005, 3)
        spec = PlanSpec(4, 1, 0, eps, time_limit=30.0, options={"ilp_backend": backend} if backend else {})
        rows.append(run_case("mixtral", pre.meta, pre.read_all(), dec.read_all(), spec, solver))
        print_row(rows[-1])
    return rows


def synthetic(
    name: str, L: int, E: int, G: int, N: int, R: int, tokens: int, budget: float, traffic: bool
) -> list[dict[str, Any]]:
    meta, r = synthetic_trace(L, E, 8, tokens, seed=0, model_name=name)
    m = split_by_prompt(r.seq_ids_T, 0.5, seed=0)
    fit, test = r.take(m), r.take(~m)
    rows = []
    for solver in ("contiguous", "eplb"):
        rows.append(run_case(name, meta, fit, test, PlanSpec(G, N, R, 0.1, time_limit=budget), solver, traffic))
        print_row(rows[-1])
    eps = max(rows[-1]["fit_imb"] - 1.0, 0.0)
    spec = PlanSpec(G, N, R, eps, time_limit=budget)
    rows.append(run_case(name, meta, fit, test, spec, "affinity", traffic))
    print_row(rows[-1])
    return rows


FRONTIER_CASES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("eplb", "eplb", {}),
    ("affinity default", "affinity", {"auto_balance": True}),
    ("affinity --unseen --balance 0.08", "affinity", {"balance_eps": 0.08, "options": {"unseen": True}}),
    ("affinity --robust 1 --balance 0.1", "affinity", {"balance_eps": 0.1, "options": {"kappa": 1.0}}),
    ("affinity --balance 0.02", "affinity", {"balance_eps": 0.02}),
    ("affinity --robust 2 --balance 0.15", "affinity", {"balance_eps": 0.15, "options": {"kappa": 2.0}}),
)


def frontier(
    name: str,
    meta: TraceMeta,
    r: RouteArrays,
    G: int,
    N: int,
    R: int,
    seeds: int,
    limit: float,
    labels: tuple[str, ...],
) -> list[dict[str, Any]]:
    """Colocation against imbalance_max on unseen prompts (fitted on a seeded half of the prompts, evaluated on
    the other half) for each case of FRONTIER_CASES named in ``labels``, over ``seeds`` splits."""
    rows: list[dict[str, Any]] = []
    for seed in range(seeds):
        m = split_by_prompt(r.seq_ids_T, 0.5, seed=seed)
        for label, solver, kw in FRONTIER_CASES:
            if label not in labels:
                continue
            spec = PlanSpec(G, N, R, time_limit=limit, seed=0, **kw)
            row = run_case(f"{name}-s{seed}", meta, r.take(m), r.take(~m), spec, solver, traffic=False)
            row["label"] = label
            rows.append(row)
            print_row(row)
    for label in labels:
        sel = [x for x in rows if x["label"] == label]
        col, imb = (np.array([x[k] for x in sel]) for k in ("test_coloc", "test_imb"))
        worst_s = max(x["solve_s"] for x in sel)
        print(
            f"  {name} G={G} N={N} R={R} {label} over {len(sel)} splits: test colocation mean {col.mean():.4f} "
            f"(min {col.min():.4f}, max {col.max():.4f}); test imbalance_max mean {imb.mean():.4f}, median "
            f"{np.median(imb):.4f} (min {imb.min():.4f}, max {imb.max():.4f}); solve <= {worst_s:.1f} s",
            flush=True,
        )
    return rows


def ds_v2_lite_frontier(quick: bool) -> list[dict[str, Any]]:
    tr = open_trace(SHARED / "deepseek-v2-lite-chat.dev.npz")
    r = tr.read_all(with_gates=False)
    rows: list[dict[str, Any]] = []
    grid = ((8, 0), (8, 8)) if quick else ((8, 0), (8, 8), (8, 16), (4, 0), (4, 8), (4, 16), (16, 0), (16, 16))
    labels = tuple(c[0] for c in FRONTIER_CASES)
    for G, R in grid:
        main = G == 8 and R in (0, 8)
        rows += frontier(
            "v2-lite", tr.meta, r, G, 1, R, 2 if quick else (3 if main else 2), 30.0, labels[:2] if not main else labels
        )
    return rows


def prompt_folds(seq_ids_T: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Boolean masks [T], one per fold: the tokens of a seeded 1/``folds`` of the prompts (disjoint, covering)."""
    uniq = np.random.default_rng(seed).permutation(np.unique(seq_ids_T))
    return [np.isin(seq_ids_T, part) for part in np.array_split(uniq, folds)]


def ds_v2_lite_kfold(quick: bool, folds: int = 5, repeats: int = 3) -> list[dict[str, Any]]:
    """The closest we get to "fitted on the whole dev file, tested on other prompts": K-fold over the prompts
    (fit on K-1 folds, test on the one left out; ``repeats`` seeded shuffles), eplb and the affinity default,
    G = 8, R = 0 and 8. Prints the default's held-out imbalance_max minus eplb's on the same fold (mean, standard
    error, min-max) and both colocations."""
    tr = open_trace(SHARED / "deepseek-v2-lite-chat.dev.npz")
    r = tr.read_all(with_gates=False)
    splits = [
        (f"s{seed}f{k}", m) for seed in range(repeats) for k, m in enumerate(prompt_folds(r.seq_ids_T, folds, seed))
    ]
    rows: list[dict[str, Any]] = []
    for R in (0, 8):
        for name, test_m in splits[:3] if quick else splits:
            for label, solver, kw in FRONTIER_CASES[:2]:
                spec = PlanSpec(8, 1, R, time_limit=30.0, seed=0, **kw)
                row = run_case(f"v2-lite-k{folds}{name}", tr.meta, r.take(~test_m), r.take(test_m), spec, solver, False)
                row["label"] = label
                rows.append(row)
                print_row(row)
        ep, de = ([x for x in rows if x["R"] == R and x["label"] == lab] for lab in ("eplb", "affinity default"))
        d = np.array([b["test_imb"] - a["test_imb"] for a, b in zip(ep, de, strict=True)])
        print(
            f"  v2-lite {folds}-fold G=8 R={R} over {d.size} folds: test imbalance_max default - eplb mean "
            f"{d.mean():+.4f} (se {d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else 0.0:.4f}, min {d.min():+.4f}, "
            f"max {d.max():+.4f}); "
            f"eplb {np.mean([x['test_imb'] for x in ep]):.4f}, default {np.mean([x['test_imb'] for x in de]):.4f}; "
            f"test colocation eplb {np.mean([x['test_coloc'] for x in ep]):.4f}, default "
            f"{np.mean([x['test_coloc'] for x in de]):.4f}; default solve <= {max(x['solve_s'] for x in de):.1f} s",
            flush=True,
        )
    return rows


def skewed_frontier(quick: bool) -> list[dict[str, Any]]:
    """Top-1, 128 experts, one layer sending 99.9 % of its tokens to one expert; 8 GPUs, 8 redundant slots.
    Matched to issue 12's instance through eplb and a loose fixed setting: skewed popularity (``skew_sigma`` 2),
    15 % of tokens following their own expert chain (``chain``, one successor) besides the prompt topics, 16,384
    tokens: eplb 0.35 colocation at held-out imbalance_max 1.20 over 6 splits (issue: 0.36 / 1.18), ``--balance
    0.15`` 1.27 on splits 0-1 (issue: 1.27) at 1.32x eplb's colocation (issue: 1.5x)."""
    meta, r = skewed_top1_trace(
        12, 128, 16384, hot_layer=5, hot_share=0.999, skew_sigma=2.0, chain=0.15, num_successors=1, seed=0
    )
    labels = ("eplb", "affinity default")
    rows = frontier("skewed-top1", meta, r, 8, 1, 8, 2 if quick else 6, 30.0, labels)
    ep, de = ([x for x in rows if x["label"] == lab] for lab in labels)
    d = np.array([b["test_imb"] - a["test_imb"] for a, b in zip(ep, de, strict=True)])
    ratio = np.array([b["test_coloc"] / a["test_coloc"] for a, b in zip(ep, de, strict=True)])
    print(
        f"  skewed-top1 default against eplb, split by split: test imbalance_max difference mean {d.mean():+.4f} "
        f"(se {d.std(ddof=1) / np.sqrt(d.size):.4f}, min {d.min():+.4f}, max {d.max():+.4f}); test colocation "
        f"{ratio.mean():.3f}x eplb's (min {ratio.min():.3f}x)",
        flush=True,
    )
    return rows


def dsv3_weak(quick: bool) -> list[dict[str, Any]]:
    """DeepSeek-V3 shape with weakly dependent layers, as issue 12 describes its instance (adjacent-layer transition
    concentration 0.28 against 0.25 if independent: ``follow`` 0.37, ``skew_sigma`` 0.67 measure 0.280 / 0.250 at
    32,768 tokens), 32 GPUs on 4 nodes, 32 redundant slots, eplb beside the default in one run; two fixed
    settings beside them (the fitted-balance reading of the issue's bar, and a robust one)."""
    meta, r = synthetic_trace(
        58, 256, 8, 16384 if quick else 32768, follow=0.37, skew_sigma=0.67, seed=0, model_name="dsv3-weak"
    )
    stats = graph_stats(graph_from_routes(r.expert_ids_TLK, meta, with_coact=False))["summary"]
    print(
        f"  dsv3-weak: transition concentration {stats['concentration_mean']:.3f} "
        f"(independent {stats['independent_mean']:.3f})"
    )
    labels = ("eplb", "affinity default", "affinity --balance 0.02", "affinity --robust 2 --balance 0.15")
    return frontier("dsv3-weak", meta, r, 32, 4, 32, 1, 30.0, labels)


HEADER = (
    f"{'instance':<18}{'G':>4}{'N':>3}{'R':>4}{'eps':>6} {'solver':<12}{'fit col':>8}{'fit imb':>8}"
    f"{'test col':>9}{'test imb':>9}{'fcst p50/p90':>13}{'home B/tok':>12}{'solve s':>9} {'status':<10}{'gap':>7}"
)


def print_row(r: dict[str, Any]) -> None:
    home = "-" if r["home_B_tok"] is None else f"{r['home_B_tok']:,.0f}"
    gap = "-" if r["gap"] is None else f"{r['gap']:.3f}"
    fcst = "-" if r.get("fcst_p50") is None else f"{r['fcst_p50']:.3f}/{r['fcst_p90']:.3f}"
    eps = "auto" if r["eps"] is None else f"{r['eps']:.3f}"
    print(
        f"{r['instance']:<18}{r['G']:>4}{r['N']:>3}{r['R']:>4}{eps:>6} {r['solver']:<12}"
        f"{r['fit_coloc']:>8.4f}{r['fit_imb']:>8.3f}{r['test_coloc']:>9.4f}{r['test_imb']:>9.3f}{fcst:>13}{home:>12}"
        f"{r['solve_s']:>9.2f} {r['status']:<10}{gap:>7}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer GPU counts and seeds, smaller synthetic traces")
    ap.add_argument("--only", nargs="*", default=None, help="instances to run")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if not SHARED.is_dir():
        print(f"skipping real traces: {SHARED} not found", file=sys.stderr)
    cases = {
        "ds-v2-lite": lambda: ds_v2_lite(args.quick),
        "ds-v2-lite-cv": lambda: ds_v2_lite_cv(args.quick),
        "ds-v2-lite-seeds": lambda: ds_v2_lite_seeds(args.quick),
        "mixtral": lambda: mixtral(args.quick),
        "v2-lite-frontier": lambda: ds_v2_lite_frontier(args.quick),
        "v2-lite-kfold": lambda: ds_v2_lite_kfold(args.quick),
        "skewed-top1": lambda: skewed_frontier(args.quick),
        "dsv3-weak": lambda: dsv3_weak(args.quick),
        "dsv3": lambda: synthetic("dsv3", 58, 256, 32, 4, 32, 16384 if args.quick else 65536, 60.0, True),
        "kimi-k2": lambda: synthetic("kimi-k2", 60, 384, 64, 8, 0, 16384 if args.quick else 49152, 60.0, False),
    }
    print(HEADER)
    rows: list[dict[str, Any]] = []
    for name, fn in cases.items():
        if args.only and name not in args.only:
            continue
        if name.startswith(("ds-v2", "mixtral")) and not SHARED.is_dir():
            continue
        rows += fn()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
