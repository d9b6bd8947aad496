"""What the past can buy: colocation against next-window balance for plans re-fitted with no move budget.

Issue 13's bar asks a re-planning policy for EPLB recompute's balance on the next window at 1.6x its colocation.
This bench asks how much of that any plan fitted on the past reaches on a stream, whatever it moves: per window
w >= 1, the affinity optimiser (``make_plan``, no move budget) re-fitted on all traffic so far and on the last
two windows at fixed balance tolerances ``eps`` and robustness ``kappa`` (placement/solvers/robust.py), scored on
window w like bench_replan.py's policies; and, as a ceiling nothing that plans from the past can pass, the same
optimiser fitted on window w itself (peeking) at the imbalance EPLB recompute realised there. Streams and the
comparator (the better balanced over the stream of EPLB on all traffic so far and on the last two windows) are
bench_replan.py's.

Dimension key: W windows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_replan import eplb_plan as eplb_for
from bench_replan import merged, streams

from placement.graph import RoutingGraph
from placement.metrics import colocation, imbalance
from placement.plan import Plan, PlanError
from placement.planner import make_plan
from placement.solvers.affinity import work_budget
from placement.solvers.base import PlanSpec

EPS = (0.05, 0.1, 0.2)
KAPPAS = (0.0, 1.0, 2.0)
WORK = 2_000_000


def affinity_fit(graph: RoutingGraph, G: int, eps: float, kappa: float, time_limit: float, work: int) -> Plan | None:
    """``make_plan`` (the affinity optimiser; the exact ILP at small sizes) on ``graph`` at tolerance ``eps`` and
    robustness ``kappa``, no move budget; None where no placement meets ``eps`` on ``graph``."""
    spec = PlanSpec(G, balance_eps=eps, time_limit=time_limit, options={"kappa": kappa, **work_budget(work)})
    try:
        return make_plan(graph, spec)
    except PlanError as exc:
        if "infeasible" not in str(exc):
            raise
        return None


def frontier_rows(
    wins: Sequence[RoutingGraph],
    G: int,
    eps: Sequence[float] = EPS,
    kappas: Sequence[float] = KAPPAS,
    time_limit: float = 10.0,
    work: int = WORK,
) -> list[dict[str, Any]]:
    """Rows (setting, window, imbalance_max and colocation on that window): EPLB recompute (eplb-all,
    eplb-last2), the re-fits (refit-{all,last2}-e{eps}-k{kappa}) and the peeking ceiling (peek-eplb: EPLB fitted
    on the window; peek-affinity: affinity fitted on it at the better EPLB recompute's realised imbalance)."""
    L, E = wins[0].load_LE.shape
    blank = Plan(G, 1, E, wins[0].meta.layers, np.tile(np.arange(E), (L, 1)), wins[0].meta.model_name)
    rows: list[dict[str, Any]] = []

    def row(name: str, w: int, plan: Plan | None) -> float:
        imb = float(imbalance(plan, wins[w])[1]) if plan else float("nan")  # None: infeasible at that tolerance
        col = colocation(plan, wins[w]) if plan else float("nan")
        rows.append({"setting": name, "window": w, "imbalance_max": imb, "colocation": col})
        return imb

    for w in range(1, len(wins)):
        fits = {"all": merged(wins[:w]), "last2": merged(wins[max(0, w - 2) : w])}
        realised = min(row(f"eplb-{h}", w, eplb_for(g, blank)) for h, g in fits.items())
        for h, g in fits.items():
            for e in eps:
                for k in kappas:
                    row(f"refit-{h}-e{e:g}-k{k:g}", w, affinity_fit(g, G, e, k, time_limit, work))
        row("peek-eplb", w, eplb_for(wins[w], blank))
        # EPLB recompute's plan is a witness that the window admits its realised balance
        row("peek-affinity", w, affinity_fit(wins[w], G, realised - 1.0 + 1e-9, 0.0, time_limit, work))
        print(f"window {w} of {len(wins) - 1} done", file=sys.stderr)
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: mean imbalance_max minus EPLB recompute's (the better of eplb-all and eplb-last2 over the
    stream) and mean colocation as a multiple of its; the best no-peek colocation at its balance and at any.
    Settings infeasible on some window are listed apart (``infeasible``)."""
    bad = {r["setting"] for r in rows if np.isnan(r["imbalance_max"])}
    names = [n for n in dict.fromkeys(r["setting"] for r in rows) if n not in bad]
    mean = {
        n: (
            float(np.mean([r["imbalance_max"] for r in rows if r["setting"] == n])),
            float(np.mean([r["colocation"] for r in rows if r["setting"] == n])),
        )
        for n in names
    }
    ref = min(("eplb-all", "eplb-last2"), key=lambda n: mean[n][0])
    imb0, col0 = mean[ref]
    table = {n: {"imbalance_vs_eplb": i - imb0, "colocation_x": c / col0} for n, (i, c) in mean.items()}
    refits = {n: t for n, t in table.items() if n.startswith("refit-")}
    balanced = [t["colocation_x"] for t in refits.values() if t["imbalance_vs_eplb"] <= 0]
    return {
        "eplb": ref,
        "eplb_imbalance_max": imb0,
        "settings": table,
        "infeasible": sorted(bad),
        "best_refit_colocation_x_at_eplb_balance": max(balanced) if balanced else None,
        "best_refit_colocation_x_any_balance": max((t["colocation_x"] for t in refits.values()), default=None),
        "peek_affinity_colocation_x": table["peek-affinity"]["colocation_x"],
    }


def print_summary(name: str, s: dict[str, Any]) -> None:
    print(f"\n== {name}: EPLB recompute ({s['eplb']}) mean imbalance_max {s['eplb_imbalance_max']:.4f}")
    print(f"{'setting':<24} {'imb - EPLB':>10} {'coloc x EPLB':>12}")
    for n, t in s["settings"].items():
        print(f"{n:<24} {t['imbalance_vs_eplb']:>+10.4f} {t['colocation_x']:>11.2f}x")
    if s["infeasible"]:
        print(f"(infeasible on some window: {', '.join(s['infeasible'])})")
    at, anyb = s["best_refit_colocation_x_at_eplb_balance"], s["best_refit_colocation_x_any_balance"]
    print(f"-- {name}: best re-fit colocation at EPLB recompute's balance {'none' if at is None else f'{at:.2f}x'}; "
          f"at any balance {'none' if anyb is None else f'{anyb:.2f}x'}; "
          f"peeking ceiling {s['peek_affinity_colocation_x']:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=["synthetic-shift", "synthetic-drift", "mixtral", "ds-v2-lite"],
                    help="stream names (bench_replan.py's)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="CI size: 4 windows per stream, one setting")
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds per fit (default 10)")
    ap.add_argument("--json", type=Path, help="write rows and summaries as JSON")
    args = ap.parse_args(argv)
    eps, kappas = ((0.1,), (0.0,)) if args.quick else (EPS, KAPPAS)
    out: dict[str, Any] = {}
    for name, (wins, G) in streams(args.quick, args.only).items():
        rows = frontier_rows(wins, G, eps, kappas, args.time_limit, WORK // 10 if args.quick else WORK)
        out[name] = {"rows": rows, "summary": summary(rows)}
        print_summary(name, out[name]["summary"])
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
