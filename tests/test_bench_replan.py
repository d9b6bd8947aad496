"""benchmarks/bench_replan.py's reading of issue 13's bar: imbalance against EPLB recompute's better policy over
the stream (not the per-window oracle), colocation against 1.6x, moves against 30 %, each on its own; and its
replay's first decision."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import numpy as np
import pytest
from bench_replan import bar_check, replay

from placement.graph import PROMPT_FOLDS, graph_from_routes
from placement.plan import Plan
from placement.trace.synthetic import synthetic_trace


def _row(policy: str, imb: float, col: float = 0.125, moves: int = 7000) -> dict[str, Any]:
    return {"policy": policy, "imbalance_max": imb, "colocation": col, "moves": moves}


EPLB = [_row("eplb", 1.170), _row("eplb-all", 1.185), _row("eplb-last2", 1.190)]


def test_bar_reads_imbalance_per_stream_and_reports_the_oracle_beside_it() -> None:
    between = bar_check([*EPLB, _row("static", 1.3, 0.25, 0), _row("service", 1.180, 0.21, 2000)])
    assert set(between) == {"service"}  # EPLB's rows and the static plan are not judged
    assert between["service"] == {"imbalance": True, "imbalance_oracle": False, "colocation": True, "moves": True}
    worse = bar_check([*EPLB, _row("service", 1.186, 0.21, 2000)])["service"]
    assert not worse["imbalance"]  # above the better of eplb-all (1.185) and eplb-last2


def test_bar_colocation_and_moves_are_thresholds_on_eplb_oracle_row() -> None:
    at = bar_check([*EPLB, _row("s", 1.1, 1.6 * 0.125, 2100)])["s"]
    assert at["colocation"] and at["moves"]
    below = bar_check([*EPLB, _row("s", 1.1, 1.59 * 0.125, 2101)])["s"]
    assert not below["colocation"] and not below["moves"]
    assert bar_check([EPLB[0], _row("s", 1.1)]) == {}  # without both recompute policies there is no reading


@pytest.mark.parametrize("first", [1, 2])
def test_replay_decides_from_its_first_window_on_what_came_before(first: int) -> None:
    meta, r = synthetic_trace(2, 8, 2, 400, num_topics=2, tokens_per_prompt=20, seed=1)
    wins = [graph_from_routes(r.expert_ids_TLK[i::4], meta, False, r.seq_ids_T[i::4], PROMPT_FOLDS) for i in range(4)]
    start = Plan(2, 1, 8, meta.layers, np.tile(np.arange(8), (2, 1)), meta.model_name)
    moved = Plan(2, 1, 8, meta.layers, np.tile(np.arange(8)[::-1], (2, 1)), meta.model_name)
    seen: list[int] = []

    def policy(history: list[Any], cur: Plan) -> Plan:
        seen.append(len(history))
        return moved

    rows = replay(wins, {"p": policy}, {"p": start}, 10, first=first)
    assert seen == list(range(first, 4))  # asked before window w with windows 0..w-1, never later ones
    assert [r["window"] for r in rows] == [1, 2, 3]
    assert [r["moves"] for r in rows] == [16 if r["window"] == first else 0 for r in rows]
    assert rows[0]["bytes"] == (160 if first == 1 else 0)
