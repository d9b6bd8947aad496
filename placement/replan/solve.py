"""``replan``: from the deployed plan, a better plan for recent traffic within a move budget.

1. Target: the project's affinity optimiser (placement.planner.make_plan, robust balance) on the recent graph,
   same GPUs, nodes and redundant slots as the current plan; its GPUs renamed to minimise moves (one renaming
   for all layers, so its metrics are kept; placement/replan/moves.py). It runs under a hard deadline
   (``TARGET_SHARE`` of the time limit plus its slack, placement/solvers/deadline.py); a target not ready by
   then is dropped and the re-plan goes on from the current plan, so ``replan`` keeps its time limit. Its search
   has a work budget (``TARGET_ANNEAL_MOVES``, placement/solvers/affinity.py), not the time left: the same
   traffic gives the same decision on any machine that does that work in time (the rest is deterministic).
2. If the target fits the budget it is a candidate as it is. Otherwise (one replica per expert) the best mix of
   current and target layers (exact dynamic programme over the layer chain), then swap search under the budget
   (placement/replan/search.py; without a target, swap search from the current plan); with replicas, the layer
   mix alone. Balance seeds are always candidates too: EPLB's plan for the recent graph (GPUs relabelled per
   layer to the current plan) when it fits the budget, else the pure balancer's plan reached within the budget:
   the mixes of current layers and EPLB's layers that (a) bring the layers over EPLB's worst robust ratio under
   it with the most colocation, and (b) lower the robust load over the mean the most (its most valuable moves).
3. Exact where it fits (one replica, few block combinations, e.g. Mixtral): the bounded-move model
   (placement/replan/exact.py) with the best heuristic answer as its hint; its proven bound is reported.
4. Every candidate (the current plan included) is scored by its forecast imbalance_max on unseen prompts
   (placement/solvers/robust.py) first, colocation on the recent graph second; the best one is returned, with
   its move list. The budget is never exceeded (every candidate is checked with ``count_moves``). When EPLB's
   plan fits the budget, no candidate that forecasts worse than it is chosen.
5. The forecast can carry a margin (``Forecaster.with_margin``: the optimism about the affinity layouts measured
   online, placement/replan/policy.py ``Calibration``): each layer not laid out as EPLB's lays it out forecasts
   that much higher.

Dimension key: L layers, E experts, F experts again, G GPUs, D bootstrap draws.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from placement.graph import RoutingGraph, unseen_share_draws
from placement.plan import Plan, PlanError, gpu_of_expert_to_phy2log
from placement.replan.moves import MoveList, align_slots, count_moves, move_list, relabel_gpus
from placement.replan.search import layer_states, robust_ratio_LG, swap_search
from placement.solvers.robust import LoadModel

EXACT_MODES = ("auto", "off", "cpsat", "pulp")
# forecasts closer than this count as equal, and colocation decides
IMBALANCE_TIE = 0.005
# which quantile of the unseen-prompt forecast ranks plans: p90 weighs the heavy prompts that hit one GPU
# (benchmarks/bench_replan.py: lower next-window imbalance than p50 on the DeepSeek-V2-Lite stream)
FORECAST_QUANTILE = "p90"
# share of the time limit for the affinity target, and the hard deadline's slack beyond it; the hard deadline
# also leaves RESERVE_SCORES times one plan's scoring (measured on the current plan) for the candidates
TARGET_SHARE = 0.45
# the target's work budget (placement/solvers/affinity.py): the same decision for the same traffic on any machine
# that does this work within the target's share of the time limit
TARGET_ANNEAL_MOVES = 4_000_000
TARGET_SLACK = 0.1
RESERVE_SCORES = 8.0
# the exact model runs only with at least EXACT_MIN_S plus its build time (variables / EXACT_VARS_PER_S) left:
# building 90,000 variables took 2-5 s on the shared 2-core machine, outside the solver's own clock
EXACT_MIN_S = 0.5
EXACT_VARS_PER_S = 20_000.0


@dataclass(frozen=True)
class ReplanResult:
    """The chosen plan, its move list from the current plan, whether it differs, why, and the scores before and
    after (``forecast_imbalance``: ``FORECAST_QUANTILE`` on unseen prompts; ``imbalance_max`` and ``colocation``
    on the graph; ``moves``, ``bytes``; ``after`` also has ``time_s``, and ``gap``/``bound`` when the exact
    model ran)."""

    plan: Plan
    moves: MoveList
    changed: bool
    reason: str
    before: dict[str, Any]
    after: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    def summary(self) -> dict[str, Any]:
        return {"changed": self.changed, "reason": self.reason, "before": self.before, "after": self.after}


@dataclass(frozen=True)
class Forecaster:
    """``predict_unseen_imbalance``'s forecast (placement/solvers/robust.py) for many plans of one graph: the fold
    bootstrap is drawn once and each plan costs one batched product. ``sim_LDE`` float64 [L, D, E]: simulated
    unseen shares per bootstrap draw (None with fewer than 8 non-empty folds). ``margin`` is added to the draws
    of every layer whose experts are grouped otherwise than in the reference plan (``same_LEF`` bool [L, E, F]:
    experts sharing a GPU there; None: no margin)."""

    sim_LDE: np.ndarray | None
    margin: float = 0.0
    same_LEF: np.ndarray | None = None

    def with_margin(self, margin: float, reference: Plan) -> Forecaster:
        """This forecast, ``margin`` higher on the layers not laid out as ``reference`` (EPLB's plan) lays them."""
        return replace(self, margin=float(margin), same_LEF=same_gpu_LEF(reference) if margin > 0 else None)

    @classmethod
    def of(cls, graph: RoutingGraph, seed: int = 0, holdout_ratio: float = 1.0, draws: int = 256) -> Forecaster:
        if graph.fold_load_SLE is None:
            return cls(None)
        sim_DLE = unseen_share_draws(graph.load_LE, graph.fold_load_SLE, holdout_ratio, draws, seed)
        if sim_DLE is None:
            return cls(None)
        return cls(np.ascontiguousarray(sim_DLE.transpose(1, 0, 2)))

    def __call__(self, plan: Plan, raw: bool = False) -> float | None:
        """The ``FORECAST_QUANTILE`` of the plan's imbalance_max over the draws (None without folds), with the
        margin unless ``raw``."""
        from placement.metrics import load_split

        if self.sim_LDE is None:
            return None
        gpu_LDG = np.matmul(self.sim_LDE, load_split(plan))
        imb_LD = gpu_LDG.max(axis=2) / np.maximum(gpu_LDG.mean(axis=2), 1e-12)
        if self.same_LEF is not None and not raw:
            own_L = (same_gpu_LEF(plan) != self.same_LEF).any(axis=(1, 2))
            imb_LD = imb_LD + self.margin * own_L[:, None]
        return float(np.quantile(imb_LD.max(axis=0), QUANTILES[FORECAST_QUANTILE]))


def same_gpu_LEF(plan: Plan) -> np.ndarray:
    """bool [L, E, F]: experts e and f have a replica on one GPU at layer l (the layout, whatever the GPU names)."""
    h_LEG = (plan.holders_LEG > 0).astype(np.float32)
    return np.asarray(np.matmul(h_LEG, h_LEG.transpose(0, 2, 1)) > 0)


QUANTILES = {"p10": 0.1, "p50": 0.5, "p90": 0.9}


def scores(plan: Plan, graph: RoutingGraph, seed: int = 0, forecast: Forecaster | None = None) -> dict[str, Any]:
    """Forecast imbalance (``FORECAST_QUANTILE``; training imbalance without prompt folds), imbalance, colocation."""
    from placement.metrics import colocation, imbalance

    fc = (forecast or Forecaster.of(graph, seed))(plan)
    imb = imbalance(plan, graph)[1]
    return {
        "forecast_imbalance": imb if fc is None else fc,
        "imbalance_max": imb,
        "colocation": colocation(plan, graph),
    }


def better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Score ``a`` beats ``b``: lower forecast imbalance (beyond the tie), else higher colocation."""
    if a["forecast_imbalance"] < b["forecast_imbalance"] - IMBALANCE_TIE:
        return True
    if a["forecast_imbalance"] > b["forecast_imbalance"] + IMBALANCE_TIE:
        return False
    return bool(a["colocation"] > b["colocation"] + 1e-9)


def target_plan(current: Plan, graph: RoutingGraph, eps: float, kappa: float, time_limit: float, seed: int) -> Plan:
    """The affinity optimiser's plan for ``graph`` on the current plan's GPUs, nodes and slots; the tolerance is
    raised to what EPLB (a pure balancer) reaches on the graph when ``eps`` is below it."""
    from placement.metrics import imbalance
    from placement.planner import make_plan
    from placement.solvers.affinity import work_budget
    from placement.solvers.base import PlanSpec

    G, N, P = current.num_gpus, current.num_nodes, current.num_slots
    reach = imbalance(eplb_plan(current, graph), graph)[1] - 1.0 + 1e-6
    spec = PlanSpec(G, N, P - current.num_experts, max(eps, reach), max(time_limit, 0.05), seed,
                    options={"kappa": kappa, **work_budget(TARGET_ANNEAL_MOVES)})  # fmt: skip
    return make_plan(graph, spec, "affinity")


def eplb_plan(current: Plan, graph: RoutingGraph) -> Plan:
    """EPLB's plan (a pure balancer) for ``graph`` on the current plan's GPUs, nodes and slots."""
    from placement.solvers.baselines import eplb_phy2log

    G, N, P = current.num_gpus, current.num_nodes, current.num_slots
    phy2log_LP = eplb_phy2log(np.asarray(graph.load_LE, dtype=np.float64), P, G, N)
    return replace(current, phy2log=phy2log_LP, provenance={"solver": "eplb"})


def _target_in_time(
    current: Plan,
    graph: RoutingGraph,
    eps: float,
    kappa: float,
    end: float,
    min_s: float,
    seed: int,
    info: dict[str, Any],
) -> Plan | None:
    """``target_plan`` relabelled to the current plan, or None when it is not ready by ``end`` (its hard
    deadline, perf_counter seconds; it plans for all but the slack of the time to it) or when less than
    ``min_s`` seconds are left for it."""
    from placement.solvers.deadline import SolveTimeout, hard_deadline

    t0 = time.perf_counter()
    share = TARGET_SHARE / (TARGET_SHARE + TARGET_SLACK)
    if end - t0 < min_s:
        info["target"] = f"skipped: {max(end - t0, 0.0):.1f} s left for it; re-planned from the current plan"
        return None
    try:
        with hard_deadline(end):
            target = target_plan(current, graph, eps, kappa, max(share * (end - t0), 0.05), seed)
    except SolveTimeout as e:
        info["target"] = f"not ready in {time.perf_counter() - t0:.1f} s ({e}); re-planned from the current plan"
        return None
    info["target_anneal_moves"] = target.provenance.get("info", {}).get("anneal_iters")  # the work it did
    return relabel_gpus(current, target)


def gpu_of(plan: Plan) -> np.ndarray:
    """int64 [L, E]: the GPU of every expert of a plan with one replica per expert."""
    from placement.solvers.greedy import phy2log_to_gpu_of

    return phy2log_to_gpu_of(plan.phy2log, plan.num_gpus)


def replan(
    current: Plan,
    graph: RoutingGraph,
    *,
    max_moves: int | None = None,
    expert_bytes: int = 0,
    balance_eps: float | None = None,
    time_limit: float = 10.0,
    seed: int = 0,
    exact: str = "auto",
    kappa: float = 2.0,
    forecast: Forecaster | None = None,
) -> ReplanResult:
    """Re-plan ``current`` for ``graph`` with at most ``max_moves`` moves (None: any); module docstring.
    ``forecast``: ``Forecaster.of(graph, seed)`` when the caller has it already."""
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    current.check_trace(graph.meta, where="current plan")
    if exact not in EXACT_MODES:
        raise PlanError(f"exact={exact!r}: choose one of {', '.join(EXACT_MODES)}")
    if max_moves is not None and max_moves < 0:
        raise PlanError(f"--max-moves {max_moves}: must be >= 0")
    if time_limit <= 0:
        raise PlanError(f"--time-limit {time_limit}: must be > 0 seconds")
    forecast = Forecaster.of(graph, seed) if forecast is None else forecast
    before = {**scores(current, graph, seed, forecast), "moves": 0, "bytes": 0}
    score_s = time.perf_counter() - t0
    empty = MoveList(current.model_name, current.num_gpus, expert_bytes, (), current.layers)
    if max_moves == 0:
        return ReplanResult(current, empty, False, "move budget 0: the current plan stays", before, dict(before))
    K = current.num_layers * current.num_slots if max_moves is None else int(max_moves)
    eps = 0.1 if balance_eps is None else float(balance_eps)
    one_replica = current.num_slots == current.num_experts
    info: dict[str, Any] = {}
    target_end = min(t0 + (TARGET_SHARE + TARGET_SLACK) * time_limit, deadline - RESERVE_SCORES * score_s)
    target = _target_in_time(current, graph, eps, kappa, target_end, 2.0 * score_s, seed, info)
    candidates: list[tuple[str, Plan]] = [("current", current)]
    if target is not None:
        info["target_moves"] = count_moves(current, target)
        if info["target_moves"] <= K:
            candidates.append(("target", target))
    lm = LoadModel.from_graph(graph, kappa=kappa)
    trans = np.asarray(graph.trans_LEE, dtype=np.float64)
    balancer = relabel_gpus(current, eplb_plan(current, graph), per_layer=True)
    if count_moves(current, balancer) <= K:
        candidates.append(("eplb", balancer))
    else:  # its layers that fix what is over EPLB's worst ratio, and those that lower the robust load most
        for how, lim in (("eplb-mix", None), ("eplb-balance", 1.0)):
            take_L = layer_states(current.holders_LEG > 0, balancer.holders_LEG > 0, trans, lm, lim, K)
            if take_L.any():
                mixed = np.where(take_L[:, None] == 1, balancer.phy2log, current.phy2log)
                candidates.append((how, replace(current, phy2log=mixed, provenance={"solver": f"replan-{how}"})))
    if one_replica:
        G = current.num_gpus
        cur_LE = gpu_of(current)
        seed_LE = cur_LE if target is None else gpu_of(target)  # no target: local search from the current plan
        ref_LE = seed_LE if target is not None else gpu_of(balancer)
        limit = 1.0 + eps
        if balance_eps is None:  # what the target (or EPLB) reaches, less the measured optimism (module docstring)
            limit = max(float(robust_ratio_LG(ref_LE, lm, G).max()), 1.0)
        mixed_LE = cur_LE
        if target is not None:
            take_L = layer_states(current.holders_LEG > 0, target.holders_LEG > 0, trans, lm, limit, K)
            mixed_LE = np.where(take_L[:, None] == 1, seed_LE, cur_LE)
        search_end = t0 + (0.75 if exact != "off" else 0.9) * time_limit
        best_LE = swap_search(mixed_LE, cur_LE, trans, lm, limit, K, search_end)
        candidates.append(("search", plan_of_gpus(current, best_LE, "replan-search")))
        if exact != "off":
            # leave time for scoring and the move list
            res = _exact(current, graph, cur_LE, best_LE, K, limit, exact, deadline - 0.05 * time_limit - 0.2, seed)
            if res is not None:
                info["exact"] = res[1]
                if res[0] is not None:
                    candidates.append(("exact", res[0]))
    elif target is not None and count_moves(current, target) > K:
        limit_or_target = None if balance_eps is None else 1.0 + eps
        take_L = layer_states(current.holders_LEG > 0, target.holders_LEG > 0, trans, lm, limit_or_target, K)
        if take_L.any():
            mixed = np.where(take_L[:, None] == 1, target.phy2log, current.phy2log)
            candidates.append(("layer-mix", replace(current, phy2log=mixed, provenance={"solver": "replan-layer-mix"})))
    scored = []
    for name, plan in candidates:
        if count_moves(current, plan) > K:  # pragma: no cover - every candidate is built within the budget
            continue
        scored.append((name, plan, scores(plan, graph, seed, forecast)))
    floor = [s["forecast_imbalance"] for n, _, s in scored if n == "eplb"]
    if floor:  # EPLB's plan fits the budget: nothing that forecasts worse than it is chosen
        scored = [c for c in scored if c[2]["forecast_imbalance"] <= floor[0] or c[0] == "eplb"]
    name, best, after = scored[0]
    for cand in scored[1:]:
        if better(cand[2], after):
            name, best, after = cand
    changed = name != "current" and count_moves(current, best) > 0
    if not changed:
        best, name = current, "current"
    moves = move_list(current, best, expert_bytes) if changed else empty
    after = {**after, "moves": len(moves.moves), "bytes": moves.total_bytes, "time_s": time.perf_counter() - t0}
    # the target's work (TARGET_ANNEAL_MOVES when it finished its budget: the decision repeats; None: no target)
    after["target_anneal_moves"] = info.get("target_anneal_moves")
    if "exact" in info:
        after.update({k: info["exact"].get(k) for k in ("status", "gap", "bound")})
    reason = _reason(name, before, after, max_moves)
    prov = {**best.provenance, "replan": {"chosen": name, "max_moves": max_moves, "reason": reason}}
    best = replace(best, provenance=prov) if changed else best
    return ReplanResult(best, moves, changed, reason, before, after, info)


def warm_up() -> None:
    """A throwaway ``replan`` of a tiny synthetic trace: loads the compiled kernels and the solvers' lazy imports
    once, so that a process's first decision does not spend its time limit on them (its target's work budget
    would be cut at the deadline and the decision would not repeat). About 2 s in a fresh process."""
    from placement.graph import PROMPT_FOLDS, graph_from_routes
    from placement.trace.synthetic import synthetic_trace

    meta, r = synthetic_trace(3, 8, 2, 800, tokens_per_prompt=10, seed=0)
    graph = graph_from_routes(r.expert_ids_TLK, meta, False, r.seq_ids_T, PROMPT_FOLDS)
    current = Plan(2, 1, 8, meta.layers, np.tile(np.arange(8), (3, 1)))
    replan(current, graph, max_moves=4, time_limit=1.0)


def plan_of_gpus(current: Plan, gpu_LE: np.ndarray, solver: str) -> Plan:
    """``current`` with every expert on the GPU ``gpu_LE`` (int64 [L, E]) gives it, slots aligned to ``current``'s."""
    phy2log = align_slots(current, gpu_of_expert_to_phy2log(gpu_LE, current.num_gpus))
    return replace(current, phy2log=phy2log, provenance={"solver": solver})


def _exact(
    current: Plan,
    graph: RoutingGraph,
    cur_LE: np.ndarray,
    hint_LE: np.ndarray,
    K: int,
    limit: float,
    mode: str,
    deadline: float,
    seed: int,
) -> tuple[Plan | None, dict[str, Any]] | None:
    """The bounded-move model where it fits (None when skipped); caps: ``limit`` on the training loads, or the
    hint's load where that is higher, so the hint is feasible."""
    from placement.replan.exact import flow_num_vars, solve_bounded

    G = current.num_gpus
    load_LE = np.asarray(graph.load_LE, dtype=np.float64)
    mean_L = load_LE.sum(axis=1) / G
    hint_load_LG = np.einsum("le,leg->lg", load_LE, (hint_LE[:, :, None] == np.arange(G)).astype(np.float64))
    cap_L = np.maximum(limit * mean_L, hint_load_LG.max(axis=1))
    num_vars = flow_num_vars(load_LE, G, cap_L)
    if mode == "auto" and num_vars > 150_000:
        return None
    left = deadline - time.perf_counter()
    if left < EXACT_MIN_S + num_vars / EXACT_VARS_PER_S:  # building the model alone would overrun
        return None
    res = solve_bounded(cur_LE, load_LE, graph.trans_LEE, G, cap_L, K, hint_LE,
                        "pulp" if mode == "pulp" else "cpsat", left, seed)  # fmt: skip
    total = float(np.asarray(graph.trans_LEE).sum()) or 1.0
    gap = None
    if res.bound is not None and res.objective is not None:
        gap = max(0.0, (res.bound - res.objective) / max(res.bound, 1e-12))
    info = {
        "status": res.status,
        "objective_colocation": None if res.objective is None else res.objective / total,
        "bound": None if res.bound is None else res.bound / total,
        "gap": gap,
        "seconds": round(res.seconds, 3),
        **res.info,
    }
    plan = None if res.gpu_LE is None else plan_of_gpus(current, res.gpu_LE, "replan-exact")
    return plan, info


def _reason(name: str, before: dict[str, Any], after: dict[str, Any], max_moves: int | None) -> str:
    if name == "current":
        return "no plan within the move budget beats the current one (forecast imbalance, then colocation)"
    budget = "any" if max_moves is None else str(max_moves)
    return (
        f"{name}: forecast imbalance {before['forecast_imbalance']:.3f} -> {after['forecast_imbalance']:.3f}, "
        f"colocation {before['colocation']:.3f} -> {after['colocation']:.3f}, {after['moves']} moves (budget {budget})"
    )
