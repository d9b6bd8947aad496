"""The service's decision policy.

With one replica per expert a decision is a local step from the deployed plan (``method`` "step", the default:
placement/replan/step.py): balance repairs, then the swaps that co-locate the most traffic per moved expert,
within a share of a full rebalance's moves. It met issue 13's bar on many more prompt orders of DeepSeek-V2-Lite
than the target-based policy below (docs/benchmarks.md), which stays for plans with redundant slots and as
``method`` "target":

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

The forecast ranks plans fitted on the same prompt folds it resamples, so it is more optimistic about the affinity
layouts (fitted to the folds' covariance) than about EPLB's (fitted to the mean loads alone). ``Calibration``
measures that online: every decision leaves the deployed plan's and EPLB's plan's forecasts, and the next
decision scores both plans on the traffic that came in between; the mean of the recent gaps (how much more the
deployed plan's forecast was optimistic than EPLB's) is what the service reports (``forecast_gap``). ``decide``
can add it, at least 0, as a ``margin`` to the forecast of every layer not laid out as EPLB's
(placement/replan/solve.py ``Forecaster.with_margin``) and forecast for the next interval's size
(``horizon_tokens``) instead of the window's; on five prompt orders of DeepSeek-V2-Lite neither lowered the
next-window imbalance beyond the run-to-run spread and both moved more (docs/benchmarks.md), so they are off by
default.

Dimension key: N scored decisions, L layers, E experts, P slots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from placement.graph import RoutingGraph
from placement.metrics import imbalance_of_loads
from placement.plan import Plan, PlanError
from placement.replan.moves import MoveList, count_moves, relabel_gpus
from placement.replan.solve import IMBALANCE_TIE, Forecaster, ReplanResult, eplb_plan, replan
from placement.replan.step import STEP_KAPPA, local_step

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
# how a decision re-plans: a local step from the deployed plan (placement/replan/step.py; plans with redundant
# slots always take the target's way), or the affinity target mixed in under the forecast budget (``replan``)
DECIDE_METHODS = ("step", "target")
# the calibration keeps the gaps of this many most recent scored decisions (their mean: the margin)
MARGIN_DECISIONS = 8


@dataclass(frozen=True)
class Calibration:
    """The forecast's measured optimism (module docstring). ``gaps_N`` float64 [N]: per scored decision, (realised
    - forecast imbalance_max of the deployed plan) - (realised - forecast of EPLB's plan) on the traffic after it;
    ``pending``: what the last decision forecast (deployed plan's, EPLB's; raw, without margin), scored against
    ``eplb_phy2log_LP`` int64 [L, P] (EPLB's plan then) at the next decision."""

    gaps_N: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pending: tuple[float, float] | None = None
    eplb_phy2log_LP: np.ndarray | None = None

    def recent_gap(self) -> float | None:
        """The mean gap of the last ``MARGIN_DECISIONS`` scored decisions (None before the first)."""
        recent_N = self.gaps_N[-MARGIN_DECISIONS:]
        return float(recent_N.mean()) if recent_N.size else None

    def margin(self) -> float:
        """``recent_gap``, at least 0 (0 before the first scored decision)."""
        return max(self.recent_gap() or 0.0, 0.0)

    def scored(self, deployed: Plan, fresh_load_LE: np.ndarray) -> Calibration:
        """With the gap of the pending forecasts on ``fresh_load_LE`` (float [L, E]: the traffic since the last
        decision; ``deployed``: the plan that served it), nothing pending."""
        fresh_LE = np.asarray(fresh_load_LE, dtype=np.float64)
        if self.pending is None or self.eplb_phy2log_LP is None or not (fresh_LE.sum(axis=1) > 0).all():
            return Calibration(self.gaps_N)
        eplb = replace(deployed, phy2log=self.eplb_phy2log_LP)
        mine, theirs = (imbalance_of_loads(p, fresh_LE)[1] for p in (deployed, eplb))
        gap = (mine - self.pending[0]) - (theirs - self.pending[1])
        return Calibration(np.append(self.gaps_N, gap)[-MARGIN_DECISIONS:])

    def after(self, res: ReplanResult) -> Calibration:
        """With the forecasts of decision ``res`` pending (none when it had no forecast)."""
        mine, theirs = res.info.get("forecast_raw"), res.info.get("eplb_forecast_raw")
        if mine is None or theirs is None:
            return Calibration(self.gaps_N)
        return Calibration(self.gaps_N, (float(mine), float(theirs)), res.info["eplb_phy2log"])

    def arrays(self) -> dict[str, np.ndarray]:
        """For a checkpoint (``from_arrays`` reads it back)."""
        pending = np.full(2, np.nan) if self.pending is None else np.asarray(self.pending, dtype=np.float64)
        eplb = np.zeros((0, 0), np.int64) if self.eplb_phy2log_LP is None else self.eplb_phy2log_LP
        return {"calib_gaps_N": self.gaps_N, "calib_pending": pending, "calib_eplb_LP": eplb}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Calibration:
        """``arrays``' calibration; an empty one when they hold none (a checkpoint written before it existed)."""
        if "calib_gaps_N" not in arrays:
            return cls()
        pending, eplb = arrays["calib_pending"], arrays["calib_eplb_LP"]
        ok = bool(np.isfinite(pending).all()) and eplb.size > 0
        pair = (float(pending[0]), float(pending[1])) if ok else None
        return cls(np.asarray(arrays["calib_gaps_N"], dtype=np.float64), pair, eplb.astype(np.int64) if ok else None)


def default_budget(plan: Plan, share: float = BUDGET_SHARE) -> int:
    """Moves allowed per decision: ``share`` of the plan's (layer, slot) placements (at least 1)."""
    return max(1, int(share * plan.num_layers * plan.num_slots))


def forecast_budget(
    current: Plan,
    graph: RoutingGraph,
    forecast: Forecaster,
    eplb: Plan | None = None,
    eplb_forecast: float | None = None,
) -> tuple[int, str]:
    """The per-decision budget (module docstring) and why: ``HIGH_SHARE`` of a full rebalance's moves when EPLB's
    plan for ``graph`` (``eplb``, computed when None; ``eplb_forecast``: its forecast when already made)
    forecasts a lower imbalance than the current plan beyond the tie, else ``LOW_SHARE``; ``BUDGET_SHARE`` of the
    placements without a forecast (too few prompt folds)."""
    eplb = eplb_plan(current, graph) if eplb is None else eplb
    mine, theirs = forecast(current), (forecast(eplb) if eplb_forecast is None else eplb_forecast)
    if mine is None or theirs is None:
        return default_budget(current), "no forecast"
    full = count_moves(current, relabel_gpus(current, eplb, per_layer=True))
    behind = mine > theirs + IMBALANCE_TIE
    k = max(default_budget(current, FLOOR_SHARE), int((HIGH_SHARE if behind else LOW_SHARE) * full))
    how = "behind" if behind else "within"
    return k, f"forecast {mine:.3f} {how} EPLB's {theirs:.3f}: budget {k} (a full rebalance moves {full})"


def steps(current: Plan, method: str = "step") -> bool:
    """Whether ``decide`` with ``method`` takes a local step from ``current`` (one replica per expert)."""
    return method == "step" and current.num_slots == current.num_experts


def decide(
    current: Plan,
    graph: RoutingGraph,
    *,
    budget: int | None = None,
    expert_bytes: int = 0,
    min_imbalance_gain: float = MIN_IMBALANCE_GAIN,
    colocation_per_move: float = COLOCATION_PER_MOVE,
    balance_eps: float | None = None,
    kappa: float | None = None,
    time_limit: float = 10.0,
    seed: int = 0,
    exact: str = "auto",
    margin: float = 0.0,
    horizon_tokens: float | None = None,
    method: str = "step",
) -> ReplanResult:
    """Re-plan ``current`` for ``graph`` within ``budget`` moves (None: ``forecast_budget``) when it pays; the
    result has ``changed=False`` and the current plan otherwise, with the reason either way. ``margin``: the
    forecast's measured optimism (``Calibration.margin``); ``horizon_tokens``: the traffic the plan will serve
    before the next decision (None: as much as the window holds). ``info`` holds what ``Calibration.after``
    keeps: the deployed plan's and EPLB's raw forecasts (``forecast_raw``, ``eplb_forecast_raw``), EPLB's plan."""
    t0 = time.perf_counter()
    if method not in DECIDE_METHODS:
        raise PlanError(f"method={method!r}: choose one of {', '.join(DECIDE_METHODS)}")
    eplb = eplb_plan(current, graph)
    ratio = 1.0 if not horizon_tokens else horizon_tokens / max(graph.num_tokens, 1)
    forecast = Forecaster.of(graph, seed, holdout_ratio=ratio).with_margin(margin, eplb)
    eplb_fc = forecast(eplb)  # its own layout: no margin

    def raw(plan: Plan, scored: dict[str, Any]) -> float | None:  # the decision's score when there is no margin
        if forecast.sim_LDE is None:
            return None
        return float(scored["forecast_imbalance"]) if margin <= 0 else forecast(plan, raw=True)

    stepping = steps(current, method)
    kappa = (STEP_KAPPA if stepping else KAPPA) if kappa is None else kappa
    calib = {"eplb_phy2log": eplb.phy2log, "eplb_forecast_raw": eplb_fc, "margin": margin, "kappa": kappa}
    if stepping:
        res = local_step(current, graph, budget=budget, kappa=kappa, expert_bytes=expert_bytes,
                         time_limit=time_limit, seed=seed, forecast=forecast, eplb=eplb,
                         holdout_ratio=ratio)  # fmt: skip
        step_info = {**calib, "forecast_raw": raw(res.plan, res.after), "budget_reason": "step"}
        return replace(res, info={**res.info, **step_info})
    if budget is None:
        k, why_k = forecast_budget(current, graph, forecast, eplb, eplb_fc)
    else:
        k, why_k = budget, "given"
    if margin > 0:
        why_k += f"; forecast margin {margin:.3f} on layers not laid out as EPLB's"
    left = max(time_limit - (time.perf_counter() - t0), 0.1 * time_limit)  # the whole decision keeps the limit
    res = replan(current, graph, max_moves=k, expert_bytes=expert_bytes, balance_eps=balance_eps,
                 kappa=kappa, time_limit=left, seed=seed, exact=exact, forecast=forecast)  # fmt: skip
    res = replace(res, info={**res.info, **calib, "budget": k, "budget_reason": why_k})
    if not res.changed:
        res = replace(res, info={**res.info, "forecast_raw": raw(current, res.before)})
        return replace(res, reason=f"{res.reason} [budget {k}: {why_k}]")
    b, a = res.before, res.after
    d_imb = b["forecast_imbalance"] - a["forecast_imbalance"]
    d_col = a["colocation"] - b["colocation"]
    moves = a["moves"]
    changed = replace(res, info={**res.info, "forecast_raw": raw(res.plan, a)})
    if d_imb >= min_imbalance_gain:
        return replace(changed, reason=f"re-planned for balance: {res.reason} [{why_k}]")
    if d_imb > -IMBALANCE_TIE and d_col >= colocation_per_move * moves:
        return replace(changed, reason=f"re-planned for colocation: {res.reason} [{why_k}]")
    why = (
        f"kept the current plan: forecast imbalance gain {d_imb:+.3f} (< {min_imbalance_gain:g}) and colocation "
        f"gain {d_col:+.4f} (< {colocation_per_move:g} x {moves} moves) do not pay for the migration [{why_k}]"
    )
    empty = MoveList(current.model_name, current.num_gpus, expert_bytes, (), current.layers)
    kept = {**b, "moves": 0, "bytes": 0, "time_s": a.get("time_s"), "target_anneal_moves": a.get("target_anneal_moves")}
    info = {**res.info, "rejected": a, "forecast_raw": raw(current, b)}
    return ReplanResult(current, empty, False, why, b, kept, info)
