"""The service's decision policy: re-plan only when the forecast gain outweighs the migration cost.

``decide`` runs ``replan`` under a per-decision move budget and keeps the current plan unless the new one
(a) lowers the forecast imbalance_max on unseen prompts by at least ``min_imbalance_gain`` (the slowest GPU sets
every layer's pace, so balance comes first), or (b) keeps the forecast within the tie and raises colocation by at
least ``colocation_per_move`` per moved expert. Defaults come from benchmarks/bench_replan.py (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import replace

from placement.graph import RoutingGraph
from placement.plan import Plan
from placement.replan.moves import MoveList
from placement.replan.solve import IMBALANCE_TIE, ReplanResult, replan

# Per-decision budget as a share of all (layer, slot) placements, the robustness of the balance (standard
# deviations of unseen-prompt load kept within the tolerance), and the gains that pay for moves.
BUDGET_SHARE = 0.2
KAPPA = 4.0
MIN_IMBALANCE_GAIN = 0.01
COLOCATION_PER_MOVE = 2e-5


def default_budget(plan: Plan) -> int:
    """Moves allowed per decision: ``BUDGET_SHARE`` of the plan's (layer, slot) placements (at least 1)."""
    return max(1, int(BUDGET_SHARE * plan.num_layers * plan.num_slots))


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
    """Re-plan ``current`` for ``graph`` within ``budget`` moves (None: ``default_budget``) when it pays; the
    result has ``changed=False`` and the current plan otherwise, with the reason either way."""
    k = default_budget(current) if budget is None else budget
    res = replan(current, graph, max_moves=k, expert_bytes=expert_bytes, balance_eps=balance_eps,
                 kappa=kappa, time_limit=time_limit, seed=seed, exact=exact)  # fmt: skip
    if not res.changed:
        return res
    b, a = res.before, res.after
    d_imb = b["forecast_imbalance"] - a["forecast_imbalance"]
    d_col = a["colocation"] - b["colocation"]
    moves = a["moves"]
    if d_imb >= min_imbalance_gain:
        return replace(res, reason=f"re-planned for balance: {res.reason}")
    if d_imb > -IMBALANCE_TIE and d_col >= colocation_per_move * moves:
        return replace(res, reason=f"re-planned for colocation: {res.reason}")
    why = (
        f"kept the current plan: forecast imbalance gain {d_imb:+.3f} (< {min_imbalance_gain:g}) and colocation "
        f"gain {d_col:+.4f} (< {colocation_per_move:g} x {moves} moves) do not pay for the migration"
    )
    empty = MoveList(current.model_name, current.num_gpus, expert_bytes, (), current.layers)
    kept = {**b, "moves": 0, "bytes": 0, "time_s": a.get("time_s")}
    return ReplanResult(current, empty, False, why, b, kept, {**res.info, "rejected": a})
