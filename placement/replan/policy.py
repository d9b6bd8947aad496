"""The service's decision policy: re-plan only when the forecast gain outweighs the migration cost.

The per-decision move budget is a share of what a full rebalance would move now (EPLB's plan for the recent
traffic, GPUs relabelled per layer to the deployed plan: what periodic EPLB recompute copies), and follows the
forecast: while the deployed plan forecasts no worse than EPLB's (within ``IMBALANCE_TIE``) a small share
(``LOW_SHARE``); when traffic has moved away from the plan and EPLB's would be better balanced, a larger one
(``HIGH_SHARE``), so that balance is won back in one or two decisions. Either way a decision copies at most
``HIGH_SHARE`` of the experts a full rebalance would, or ``FLOOR_SHARE`` of all placements where that is more
(a plan close to EPLB's can still gain colocation).

``decide`` runs ``replan`` under that budget and keeps the current plan unless the new one
(a) lowers the forecast imbalance_max on unseen prompts by at least ``min_imbalance_gain`` (the slowest GPU sets
every layer's pace, so balance comes first), or (b) keeps the forecast within the tie and raises colocation by at
least ``colocation_per_move`` per moved expert. Defaults come from benchmarks/bench_replan.py (docs/benchmarks.md).
"""

from __future__ import annotations

import time
from dataclasses import replace

from placement.graph import RoutingGraph
from placement.plan import Plan
from placement.replan.moves import MoveList, count_moves, relabel_gpus
from placement.replan.solve import IMBALANCE_TIE, Forecaster, ReplanResult, eplb_plan, replan

# Per-decision budget as a share of a full rebalance's moves (module docstring; without a forecast BUDGET_SHARE
# of all (layer, slot) placements), the robustness of the balance (standard deviations of unseen-prompt load kept
# within the tolerance), and the gains that pay for moves.
BUDGET_SHARE = 0.2
LOW_SHARE = 0.1
HIGH_SHARE = 0.3
FLOOR_SHARE = 0.05
KAPPA = 4.0
MIN_IMBALANCE_GAIN = 0.01
COLOCATION_PER_MOVE = 2e-5


def default_budget(plan: Plan, share: float = BUDGET_SHARE) -> int:
    """Moves allowed per decision: ``share`` of the plan's (layer, slot) placements (at least 1)."""
    return max(1, int(share * plan.num_layers * plan.num_slots))


def forecast_budget(current: Plan, graph: RoutingGraph, forecast: Forecaster) -> tuple[int, str]:
    """The per-decision budget (module docstring) and why: ``HIGH_SHARE`` of a full rebalance's moves when EPLB's
    plan for ``graph`` forecasts a lower imbalance than the current plan beyond the tie, else ``LOW_SHARE``;
    ``BUDGET_SHARE`` of the placements without a forecast (too few prompt folds)."""
    eplb = eplb_plan(current, graph)
    mine, theirs = forecast(current), forecast(eplb)
    if mine is None or theirs is None:
        return default_budget(current), "no forecast"
    full = count_moves(current, relabel_gpus(current, eplb, per_layer=True))
    behind = mine > theirs + IMBALANCE_TIE
    k = max(default_budget(current, FLOOR_SHARE), int((HIGH_SHARE if behind else LOW_SHARE) * full))
    how = "behind" if behind else "within"
    return k, f"forecast {mine:.3f} {how} EPLB's {theirs:.3f}: budget {k} (a full rebalance moves {full})"


def decide(
    current: Plan,
    graph: RoutingGraph,
    *,
    budget: int | None = None,
    expert_bytes: int = 0,
    min_imbalance_gain: float = MIN_IMBALANCE_GAIN,
    colocation_per_move: float = COLOCATION_PER_MOVE,
    balance_eps: float | None = None,
    kappa: float = KAPPA,
    time_limit: float = 10.0,
    seed: int = 0,
    exact: str = "auto",
) -> ReplanResult:
    """Re-plan ``current`` for ``graph`` within ``budget`` moves (None: ``forecast_budget``) when it pays; the
    result has ``changed=False`` and the current plan otherwise, with the reason either way."""
    t0 = time.perf_counter()
    forecast = Forecaster.of(graph, seed)
    k, why_k = (budget, "given") if budget is not None else forecast_budget(current, graph, forecast)
    left = max(time_limit - (time.perf_counter() - t0), 0.1 * time_limit)  # the whole decision keeps the limit
    res = replan(current, graph, max_moves=k, expert_bytes=expert_bytes, balance_eps=balance_eps,
                 kappa=kappa, time_limit=left, seed=seed, exact=exact, forecast=forecast)  # fmt: skip
    res = replace(res, info={**res.info, "budget": k, "budget_reason": why_k})
    if not res.changed:
        return replace(res, reason=f"{res.reason} [budget {k}: {why_k}]")
    b, a = res.before, res.after
    d_imb = b["forecast_imbalance"] - a["forecast_imbalance"]
    d_col = a["colocation"] - b["colocation"]
    moves = a["moves"]
    if d_imb >= min_imbalance_gain:
        return replace(res, reason=f"re-planned for balance: {res.reason} [{why_k}]")
    if d_imb > -IMBALANCE_TIE and d_col >= colocation_per_move * moves:
        return replace(res, reason=f"re-planned for colocation: {res.reason} [{why_k}]")
    why = (
        f"kept the current plan: forecast imbalance gain {d_imb:+.3f} (< {min_imbalance_gain:g}) and colocation "
        f"gain {d_col:+.4f} (< {colocation_per_move:g} x {moves} moves) do not pay for the migration [{why_k}]"
    )
    empty = MoveList(current.model_name, current.num_gpus, expert_bytes, (), current.layers)
    kept = {**b, "moves": 0, "bytes": 0, "time_s": a.get("time_s")}
    return ReplanResult(current, empty, False, why, b, kept, {**res.info, "rejected": a})
