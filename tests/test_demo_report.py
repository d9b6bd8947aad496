"""The demo explains itself: progress lines when its output is not a terminal, a table that says what its columns
mean, marks the best plan per GPU count and ends in one takeaway; its HTML report says which prompts it evaluated
on, covers every GPU count of the table and shows the numbers ``evaluate()`` gives."""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pytest

from placement.demo import best_rows, takeaway


def _row(gpus: int, solver: str, coloc: float, imb: float, bytes_: float = 100.0) -> dict[str, object]:
    return {"gpus": gpus, "solver": solver, "status": "heuristic", "colocation": coloc, "imbalance_max": imb,
            "home_bytes_per_token": bytes_}  # fmt: skip


def test_best_rows_prefer_colocation_within_the_balance() -> None:
    rows = [
        _row(2, "contiguous", 0.40, 1.05),
        _row(2, "affinity", 0.60, 1.09),
        _row(2, "ilp", 0.70, 1.20),  # more co-located but over the 1.10 balance
        {"gpus": 2, "solver": "eplb", "status": "no plan", "error": "x"},
        _row(4, "contiguous", 0.20, 1.30),
        _row(4, "eplb", 0.10, 1.15),  # nothing within the balance: the best balanced one
    ]
    assert best_rows(rows) == [1, 5]
    assert best_rows(rows, balance=0.25) == [2, 5]


def test_takeaway_is_one_sentence_about_the_biggest_saving() -> None:
    rows = [
        _row(2, "contiguous", 0.40, 1.05, 100.0),
        _row(2, "affinity", 0.60, 1.08, 80.0),
        _row(4, "contiguous", 0.20, 1.05, 100.0),
        _row(4, "ilp", 0.30, 1.07, 90.0),
    ]
    text = takeaway(rows)
    assert text == (
        "On 2 GPUs, affinity keeps 60% of a token's layer-to-layer expert steps on one GPU vs 40% for the "
        "contiguous layout, so the all-to-all moves 20% fewer bytes per token, with the busiest GPU at 1.08x the "
        "mean load, on prompts the plans never saw."
    )
    assert "no solver beat" in takeaway(rows[:1])


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, cli) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    code, stdout, stderr = cli("demo", "--out", out, "--gpus", "2,4", "--time-limit", 1)
    assert code == 0, stderr
    return out, stdout, stderr


def _report_rows(page: str) -> dict[str, list[str]]:
    table = page[page.index("<h2>Plan comparison</h2>") :].split("</table>")[0]
    rows = {}
    for tr in re.findall(r"<tr>(.*?)</tr>", table)[1:]:
        cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", tr)]
        rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_demo_progress_table_and_report(demo: tuple[Path, str, str]) -> None:
    from placement.graph import graph_from_routes
    from placement.metrics import evaluate
    from placement.plan import Plan
    from placement.trace.dataset import open_trace
    from placement.trace.schema import split_by_prompt

    out, stdout, stderr = demo
    # progress: plain lines on stderr while it works (CliRunner's stderr is no terminal)
    steps = [ln for ln in stderr.splitlines() if re.match(r"\[ *\d+\.\d s\] ", ln)]
    assert any("profiled" in ln for ln in steps) and any("planning affinity for 4 GPUs" in ln for ln in steps)
    assert any("writing the HTML report of all" in ln for ln in steps)
    # the table: what each column means, one best plan per GPU count, one takeaway
    for words in ("colocation ↑", "imbalance max ↓", "status ", "gap ↓", "★ best"):
        assert words in stdout
    table_rows = [ln for ln in stdout.splitlines() if ln.startswith("│")]
    assert sum("★" in ln for ln in table_rows) == 2
    assert sum(ln.startswith("Takeaway: ") for ln in stdout.splitlines()) == 1
    assert "held-out prompts (of 312" in stdout
    # the report: which prompts, every plan of the table, the numbers evaluate() gives on those prompts
    page = (out / "report.html").read_text()
    assert "the 156 test prompts of 312" in page
    tr = open_trace(out / "trace")
    routes = tr.read_all(with_gates=False)
    test = routes.take(~split_by_prompt(routes.seq_ids_T, 0.5, 0))
    g_test = graph_from_routes(test.expert_ids_TLK, tr.meta, with_coact=False)
    rows = _report_rows(page)
    planned = sorted(p.stem for p in (out / "plans").glob("*.json"))
    assert sorted(rows) == planned and {n.rsplit("-g", 1)[1] for n in planned} == {"2", "4"}
    for name in planned:
        ev = evaluate(Plan.load(out / "plans" / f"{name}.json"), g_test, test)
        cells = rows[name]
        assert cells[4:6] == [f"{ev['colocation']:.3f}", f"{ev['imbalance_max']:.3f}"], name
        assert cells[7] == f"{ev['imbalance_mean']:.3f}" and cells[8] == f"{ev['home']['bytes_per_token']:.0f}"
        line = next(ln for ln in table_rows if f" {name.rsplit('-g', 1)[0]} " in ln and ln.split("│")[1].strip()
                    == name.rsplit("-g", 1)[1])  # fmt: skip
        assert f" {ev['colocation']:.3f} " in line and f" {ev['imbalance_max']:.3f} " in line
        assert f"{ev['home']['bytes_per_token']:,.0f}" in line
    assert np.unique(test.seq_ids_T).size == 156
