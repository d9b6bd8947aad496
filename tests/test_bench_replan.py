"""benchmarks/bench_replan.py's reading of issue 13's bar: imbalance against EPLB recompute's better policy over
the stream (not the per-window oracle), colocation against 1.6x, moves against 30 %, each on its own."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_replan import bar_check


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
