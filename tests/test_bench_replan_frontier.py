"""benchmarks/bench_replan_frontier.py: the comparator and the best re-fit it reports, and the peeking ceiling held
to EPLB recompute's realised balance on the window it is fitted on."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import numpy as np
from bench_replan_frontier import frontier_rows, summary

from placement.graph import PROMPT_FOLDS, graph_from_routes
from placement.trace.synthetic import synthetic_trace


def _rows(setting: str, imb: list[float], col: list[float]) -> list[dict[str, Any]]:
    return [{"setting": setting, "window": w + 1, "imbalance_max": i, "colocation": c}
            for w, (i, c) in enumerate(zip(imb, col, strict=True))]  # fmt: skip


def test_summary_reads_against_the_better_eplb_recompute_and_picks_the_best_balanced_refit() -> None:
    rows = [
        *_rows("eplb-all", [1.30, 1.30], [0.25, 0.25]),
        *_rows("eplb-last2", [1.20, 1.20], [0.20, 0.20]),  # better balanced: the comparator
        *_rows("refit-all-e0.1-k0", [1.40, 1.40], [0.40, 0.40]),  # more co-located, less balanced
        *_rows("refit-last2-e0.1-k2", [1.10, 1.20], [0.30, 0.30]),  # within EPLB's balance
        *_rows("peek-eplb", [1.0, 1.0], [0.2, 0.2]),
        *_rows("peek-affinity", [1.2, 1.2], [0.36, 0.36]),
    ]
    s = summary(rows)
    assert s["eplb"] == "eplb-last2" and np.isclose(s["eplb_imbalance_max"], 1.20)
    assert np.isclose(s["best_refit_colocation_x_at_eplb_balance"], 1.5)
    assert np.isclose(s["best_refit_colocation_x_any_balance"], 2.0)
    assert np.isclose(s["peek_affinity_colocation_x"], 1.8)
    assert np.isclose(s["settings"]["refit-last2-e0.1-k2"]["imbalance_vs_eplb"], -0.05)
    only_worse = summary([r for r in rows if r["setting"] != "refit-last2-e0.1-k2"])
    assert only_worse["best_refit_colocation_x_at_eplb_balance"] is None
    gap = summary([*rows, *_rows("refit-all-e0.05-k0", [float("nan"), 1.0], [float("nan"), 0.6])])
    assert gap["infeasible"] == ["refit-all-e0.05-k0"] and "refit-all-e0.05-k0" not in gap["settings"]
    assert np.isclose(gap["best_refit_colocation_x_any_balance"], 2.0)  # an infeasible window is not a mean of one


def test_the_peeking_ceiling_holds_eplb_recompute_s_realised_balance_on_its_window() -> None:
    meta, r = synthetic_trace(4, 16, 2, 2400, num_topics=4, tokens_per_prompt=20, seed=3)
    wins = [graph_from_routes(r.expert_ids_TLK[i::3], meta, False, r.seq_ids_T[i::3], PROMPT_FOLDS) for i in range(3)]
    rows = frontier_rows(wins, 4, eps=(0.0, 1.0), kappas=(0.0,), time_limit=2.0, work=100_000)
    by = {(x["setting"], x["window"]): x for x in rows}
    assert {s for s, _ in by} == {"eplb-all", "eplb-last2", "refit-all-e0-k0", "refit-last2-e0-k0",
                                  "refit-all-e1-k0", "refit-last2-e1-k0", "peek-eplb", "peek-affinity"}  # fmt: skip
    assert np.isnan(by["refit-all-e0-k0", 1]["imbalance_max"])  # perfect balance: no placement, reported so
    assert not np.isnan(by["refit-all-e1-k0", 1]["imbalance_max"])
    for w in (1, 2):
        realised = min(by["eplb-all", w]["imbalance_max"], by["eplb-last2", w]["imbalance_max"])
        assert by["peek-affinity", w]["imbalance_max"] <= realised + 1e-9
