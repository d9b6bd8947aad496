"""Scalable affinity optimiser: co-locate experts that tokens visit in consecutive layers, under load balance.

Objective (maximised): co-located transition traffic, sum over l, i, j of trans[l, i, j] * [i, j share a bin],
topology-weighted when there are several nodes. Balance: every bin's robust load ratio (placement/solvers/
robust.py: training share plus kappa standard deviations of the share on unseen prompts) stays <= 1 + eps.

Method:
1. Layer-chain block-coordinate descent. With every other layer fixed, placing layer l is a capacitated
   assignment: expert e earns w[e, b] = traffic between e and the experts in bin b at layers l-1 and l+1. Each
   step solves it exactly as a linear assignment (bins repeated E/B times; scipy's Jonker-Volgenant), then
   repairs balance with the cheapest ratio-reducing swaps. Random restarts keep the best.
   With N > 1 nodes this runs on nodes first, then on GPUs restricted to each expert's node.
2. Swap annealing over all GPUs (placement/solvers/anneal.py), O(1) per move, under the same balance rule.
3. Redundant slots take affinity-aware replicas (placement/solvers/replicate.py).

Steps 1 and 2 run until the deadline by default: as many restarts as fit (at most ``MAX_RESTARTS``), annealing
as long as the time left allows, so the plan depends on the machine's speed. A work budget in the spec's options
(``restarts``, fewer than ``MAX_RESTARTS``; ``anneal_moves``: that many moves on a fixed cooling schedule in
``FIXED_CHUNKS`` chunks) makes the same inputs and seed give the same plan on any machine that finishes the work
before the deadline (the deadline still stops it: a valid plan, then of less work). The re-planner's target uses
one (placement/replan/solve.py ``TARGET_ANNEAL_MOVES``), so the service's decisions repeat.

Dimension key: L layers, X layer pairs (L-1), E experts, B bins (GPUs or nodes), G GPUs, N nodes, P slots.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from placement.graph import RoutingGraph
from placement.plan import Plan, PlanError, gpu_of_expert_to_phy2log
from placement.solvers.anneal import anneal, neighbour_weights
from placement.solvers.base import PlanSpec, SolveResult
from placement.solvers.deadline import check_deadline
from placement.solvers.layer_assign import assign_layer
from placement.solvers.replicate import add_replicas, replica_counts, robust_repair
from placement.solvers.robust import LoadModel, predict_unseen_imbalance

MAX_RESTARTS = 32  # chain-descent restarts at most, when the deadline alone stops them
FIXED_CHUNKS = 8  # a fixed annealing budget runs in this many chunks, the deadline checked between them


def work_budget(anneal_moves: int, restarts: int = 1) -> dict[str, int]:
    """Spec options of a work budget (module docstring): ``restarts`` chain descents, ``anneal_moves`` moves;
    {} (run until the deadline) for 0 moves."""
    if anneal_moves < 0 or not 1 <= restarts < MAX_RESTARTS:
        raise PlanError(f"work budget: moves {anneal_moves} must be >= 0, restarts {restarts} in 1..{MAX_RESTARTS - 1}")
    return {"restarts": restarts, "anneal_moves": anneal_moves} if anneal_moves else {}


def neighbour_score(l: int, bin_LE: np.ndarray, trans_XEE: np.ndarray, num_bins: int, only: str = "both") -> np.ndarray:
    """w_EB for layer l: traffic from bin b's experts at l-1 into e, plus from e to bin b's experts at l+1."""
    L, E = bin_LE.shape
    w = np.zeros((E, num_bins))
    if l > 0 and only in ("both", "prev"):
        onehot_EB = np.zeros((E, num_bins))
        onehot_EB[np.arange(E), bin_LE[l - 1]] = 1.0
        w += trans_XEE[l - 1].T @ onehot_EB
    if l < L - 1 and only in ("both", "next"):
        onehot_EB = np.zeros((E, num_bins))
        onehot_EB[np.arange(E), bin_LE[l + 1]] = 1.0
        w += trans_XEE[l] @ onehot_EB
    return w


def smoothed_transitions(trans_XEE: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * trans + alpha * (what layer independence predicts from the row and column totals):
    shrinks noisy pair counts so that the placement generalises to unseen prompts."""
    t = trans_XEE.astype(np.float64)
    if alpha <= 0 or t.shape[0] == 0:
        return t
    row_XE = t.sum(axis=2)
    col_XE = t.sum(axis=1)
    tot_X = np.maximum(t.sum(axis=(1, 2)), 1e-12)
    indep_XEE = row_XE[:, :, None] * col_XE[:, None, :] / tot_X[:, None, None]
    return np.asarray((1.0 - alpha) * t + alpha * indep_XEE)


def colocated(bin_LE: np.ndarray, trans_XEE: np.ndarray) -> float:
    """sum over l, i, j of trans[l, i, j] * [bin(l, i) == bin(l+1, j)]."""
    same_XEE = bin_LE[:-1, :, None] == bin_LE[1:, None, :]
    return float((trans_XEE * same_XEE).sum())


def chain_descent(
    trans_XEE: np.ndarray,
    lm: LoadModel,
    num_bins: int,
    limit: float,
    deadline: float,
    rng: np.random.Generator,
    allowed_LEB: np.ndarray | None = None,
    max_sweeps: int = 30,
) -> tuple[np.ndarray, float]:
    """Block-coordinate descent over layers from a greedy chain start. Returns (bin_LE, co-located traffic)."""
    L, E = lm.share_LE.shape

    def place(l: int, w_EB: np.ndarray) -> np.ndarray:
        check_deadline("affinity layer assignment")  # a caller's hard limit (placement/solvers/deadline.py)
        # past the deadline the repairs stop at once: the remaining layers of a start take a balanced packing
        return assign_layer(w_EB, lm, l, limit, None if allowed_LEB is None else allowed_LEB[l], None, deadline)

    bin_LE = np.zeros((L, E), dtype=np.int64)
    start = int(rng.integers(L))
    bin_LE[start] = place(start, rng.random((E, num_bins)))
    for l in range(start + 1, L):
        bin_LE[l] = place(l, neighbour_score(l, bin_LE, trans_XEE, num_bins, only="prev"))
    for l in range(start - 1, -1, -1):
        bin_LE[l] = place(l, neighbour_score(l, bin_LE, trans_XEE, num_bins, only="next"))
    best = colocated(bin_LE, trans_XEE)
    for sweep in range(max_sweeps):
        if time.perf_counter() > deadline:
            break
        for l in range(L) if sweep % 2 == 0 else range(L - 1, -1, -1):
            if time.perf_counter() > deadline:  # every layer is placed: stopping mid-sweep leaves a valid plan
                break
            bin_LE[l] = place(l, neighbour_score(l, bin_LE, trans_XEE, num_bins))
        score = colocated(bin_LE, trans_XEE)
        if score <= best * (1 + 1e-6):
            best = max(best, score)
            break
        best = score
    return bin_LE, best


def _best_of_restarts(
    trans: np.ndarray,
    lm: LoadModel,
    B: int,
    limit: float,
    deadline: float,
    rng: np.random.Generator,
    allowed: np.ndarray | None,
    info: dict[str, Any],
    level: str,
    max_restarts: int = MAX_RESTARTS,
) -> np.ndarray:
    """The most co-located of ``chain_descent`` restarts: as many as fit before ``deadline`` (at most
    ``MAX_RESTARTS``), or exactly ``max_restarts`` when fewer are asked for (the work budget, module
    docstring), unless the deadline passes first."""
    best_LE, best = None, -1.0
    durations: list[float] = []
    while True:
        t0 = time.perf_counter()
        bin_LE, score = chain_descent(trans, lm, B, limit, deadline, rng, allowed)
        durations.append(time.perf_counter() - t0)
        if score > best:
            best_LE, best = bin_LE, score
        if len(durations) >= max_restarts:
            break
        if max_restarts == MAX_RESTARTS and time.perf_counter() + 1.2 * max(durations) > deadline:
            break
        if time.perf_counter() > deadline:  # a fixed number of restarts still stops at the deadline
            break
    info[f"{level}_restarts"] = len(durations)
    if best_LE is None:  # pragma: no cover - the loop runs at least once
        raise RuntimeError("affinity: no restart completed")
    return best_LE


def place_gpus(
    graph: RoutingGraph, spec: PlanSpec, lm: LoadModel, deadline: float
) -> tuple[np.ndarray, dict[str, Any]]:
    """GPU of every expert, int64 [L, E] (E/G per GPU): nodes first (if N > 1), then GPUs within nodes, then
    swap annealing over all GPUs with the topology-weighted objective."""
    t0 = time.perf_counter()
    G, N = spec.num_gpus, spec.num_nodes
    # With replicas still to come, leave them room: primaries fit a tighter limit.
    limit = 1.0 + spec.balance_eps * (float(spec.options.get("primary_margin", 0.7)) if spec.num_redundant else 1.0)
    trans = smoothed_transitions(graph.trans_LEE, float(spec.options.get("smooth", 0.0)))
    rng = np.random.default_rng(spec.seed)
    restarts = min(int(spec.options.get("restarts", MAX_RESTARTS)), MAX_RESTARTS)
    timed = restarts == MAX_RESTARTS  # no work budget: the restarts stop when the next one would not fit
    info: dict[str, Any] = {"kappa": lm.kappa}
    allowed = None
    if N > 1:
        # Nodes get half the tolerance, so that their GPUs can still be balanced within the full one.
        node_limit = 1.0 + 0.5 * (limit - 1.0)
        node_end = t0 + (deadline - t0) * 0.25 if timed else deadline
        node_LE = _best_of_restarts(trans, lm, N, node_limit, node_end, rng, None, info, "node", restarts)
        allowed = (np.arange(G)[None, None, :] // (G // N)) == node_LE[:, :, None]
    gpu_end = t0 + (deadline - t0) * 0.6 if timed else deadline  # a work budget's restarts are not cut early
    gpu_LE = _best_of_restarts(trans, lm, G, limit, gpu_end, rng, allowed, info, "gpu", restarts)
    info["bcd_colocated"] = colocated(gpu_LE, trans) / max(float(trans.sum()), 1.0)
    # Annealing over all GPUs (crossing nodes), topology-weighted: a pair on one GPU is worth
    # inter_node_cost, on one node inter_node_cost - 1 (the cost saved against a cross-node pair).
    node_G = np.arange(G) // (G // N)
    node_w = spec.inter_node_cost - 1.0 if N > 1 else 0.0
    W_LEG = neighbour_weights(gpu_LE, trans, G)
    temp0 = max(float(spec.options.get("anneal_temp", 0.02)) * float(W_LEG.sum(axis=2).mean()), 1e-9)
    model = (lm.share_LE, lm.cov_LEE, lm.kappa, limit, node_G, node_w)
    info["anneal_iters"] = anneal_until(gpu_LE, W_LEG, trans, model, deadline, temp0, spec.seed, spec)
    info["colocated_fit"] = colocated(gpu_LE, trans) / max(float(trans.sum()), 1.0)
    return gpu_LE, info


def anneal_until(
    bin_LE: np.ndarray,
    W_LEG: np.ndarray,
    trans_XEE: np.ndarray,
    model: tuple[np.ndarray, np.ndarray, float, float, np.ndarray, float],
    deadline: float,
    temp0: float,
    seed: int,
    spec: PlanSpec,
) -> int:
    """Swap annealing (placement/solvers/anneal.py; ``model``: share_LE, cov_LEE, kappa, limit, node of each GPU,
    node pair value) in place until ``deadline``, cooling geometrically from temp0 to temp0 / 1000.
    Runs in chunks: after each one the move rate is measured and the remaining moves re-planned, so a slow or
    busy machine ends the schedule early instead of overrunning the wall clock. Returns the moves tried."""
    share_LE, cov_LEE, kappa, limit, node_G, node_w = model
    args = (share_LE, cov_LEE, kappa, limit, node_G, 1.0, node_w)
    fixed = int(spec.options.get("anneal_moves", 0))
    if fixed > 0:  # the work budget: the same moves and schedule on any machine, unless the deadline passes first
        done, temp = 0, temp0
        for chunk in range(FIXED_CHUNKS):
            if time.perf_counter() > deadline:
                break
            n = fixed // FIXED_CHUNKS + (fixed % FIXED_CHUNKS if chunk == FIXED_CHUNKS - 1 else 0)
            end = temp0 * 1e-3 ** ((chunk + 1) / FIXED_CHUNKS)
            anneal(bin_LE, W_LEG, trans_XEE, *args, n, temp, end, seed + chunk)
            temp, done = end, done + n
        return done
    rate = float(spec.options.get("anneal_rate", 2e6))  # moves per second, first guess
    temp, temp1, done = temp0, 1e-3 * temp0, 0
    for chunk in range(64):
        left_s = deadline - time.perf_counter()
        planned = int(left_s * rate)
        if planned < 1000:
            break
        n = max(min(planned // max(8 - chunk, 2), 200_000 if chunk == 0 else planned), 1000)  # 1st: calibration
        end = temp * (temp1 / temp) ** (n / planned)
        t0 = time.perf_counter()
        anneal(bin_LE, W_LEG, trans_XEE, *args, n, temp, end, seed + chunk)
        rate = n / max(time.perf_counter() - t0, 1e-6)
        temp, done = end, done + n
    return done


def check_balance_reached(phy2log_LP: np.ndarray, graph: RoutingGraph, spec: PlanSpec) -> None:
    """Raise PlanError when the plan's busiest GPU is over (1 + eps) * mean in some layer of the fitted trace,
    naming the tolerance that was reached (and EPLB's, a pure balancer) so the user can choose --balance."""
    from placement.metrics import imbalance
    from placement.solvers.baselines import eplb_phy2log

    def worst(phy: np.ndarray) -> float:
        plan = Plan(spec.num_gpus, spec.num_nodes, graph.num_experts, graph.meta.layers, phy)
        return imbalance(plan, graph)[1]

    reached = worst(phy2log_LP)
    if reached <= 1.0 + spec.balance_eps + 1e-9:
        return
    P = graph.num_experts + spec.num_redundant
    eplb = worst(eplb_phy2log(graph.load_LE.astype(np.float64), P, spec.num_gpus, spec.num_nodes))
    raise PlanError(
        f"--balance {spec.balance_eps:g} was not reached: the affinity plan keeps GPUs within "
        f"{reached - 1:.3f} of the mean (eplb reaches {eplb - 1:.3f}); raise --balance"
        + (" or add --redundant slots" if spec.num_redundant == 0 else "")
    )


def solve_affinity(graph: RoutingGraph, spec: PlanSpec) -> SolveResult:
    """Affinity placement; see the module docstring. Replicas fill ``spec.num_redundant`` slots. The planner
    fills in the topology cost and the gap to the capacity bound. With ``options["unseen"]`` the balance
    tolerance applies to the forecast of unseen prompts (``solve_for_unseen``)."""
    if spec.options.get("unseen"):
        return solve_for_unseen(graph, spec)
    return solve_fixed(graph, spec, time.perf_counter() + float(spec.time_limit))


def solve_fixed(graph: RoutingGraph, spec: PlanSpec, deadline: float) -> SolveResult:
    """Affinity placement at the fixed tolerance ``spec.balance_eps``, done by ``deadline`` (wall clock): the
    search stops early enough to leave a tenth of the time to replicas and the eplb floor. BLAS runs on one
    thread: the products here are small (E x G), and on a busy machine threaded BLAS made them 10-50x slower."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _solve_fixed(graph, spec, deadline)


def _solve_fixed(graph: RoutingGraph, spec: PlanSpec, deadline: float) -> SolveResult:
    t0 = time.perf_counter()
    E, G = graph.num_experts, spec.num_gpus
    if E % G:
        raise PlanError(f"affinity needs E={E} divisible by --gpus {G} (replicas go on top of E/G per GPU)")
    kappa = float(spec.options.get("kappa", 0.0))
    copies_LE = replica_counts(graph, spec)
    holdout = float(spec.options.get("holdout_ratio", 1.0))
    lm = LoadModel.from_graph(graph, kappa=kappa, holdout_ratio=holdout, copies_LE=copies_LE)
    floor_LP = eplb_floor_start(graph, spec) if spec.options.get("eplb_floor", True) else None
    gpu_LE, info = place_gpus(graph, spec, lm, deadline - 0.1 * max(deadline - time.perf_counter(), 0.0))
    phy2log_LP = add_replicas(gpu_LE, graph, spec, copies_LE, lm)
    if spec.num_redundant and kappa > 0:  # replicas and primaries judged together on unseen prompts
        whole = LoadModel.from_graph(graph, kappa=kappa, holdout_ratio=holdout)
        trans = graph.trans_LEE.astype(np.float64)
        phy2log_LP = robust_repair(phy2log_LP, trans, whole, G, 1.0 + spec.balance_eps, deadline)
    if floor_LP is not None:  # off for the default's search, which keeps eplb's plan at hand
        phy2log_LP = never_below_eplb(phy2log_LP, floor_LP, graph, spec, deadline, info)
    check_balance_reached(phy2log_LP, graph, spec)
    return SolveResult(phy2log_LP, "affinity", "heuristic", solve_seconds=time.perf_counter() - t0, info=info)


def eplb_floor_start(graph: RoutingGraph, spec: PlanSpec) -> np.ndarray:
    """phy2log [L, P] that ``never_below_eplb`` starts from: EPLB's plan, copies on distinct GPUs (``eplb_start``)."""
    from placement.solvers.baselines import eplb_phy2log

    G, E = spec.num_gpus, graph.num_experts
    eplb_LP = eplb_phy2log(graph.load_LE.astype(np.float64), E + spec.num_redundant, G, spec.num_nodes)
    return eplb_start(eplb_LP, graph, G, 1.0 + spec.balance_eps + 1e-9)


def never_below_eplb(
    phy2log_LP: np.ndarray,
    start_LP: np.ndarray,
    graph: RoutingGraph,
    spec: PlanSpec,
    deadline: float,
    info: dict[str, Any],
) -> np.ndarray:
    """The plan, or a plan grown from EPLB's (``start_LP``, from ``eplb_floor_start``) when that one is within
    1 + eps on the fitted trace and the plan is not (or co-locates less): EPLB's packing improved by swap
    annealing under the same limit until ``deadline`` (no replicas), or EPLB's plan with its second copies on one
    GPU swapped for copies elsewhere (replicas). So affinity reaches every balance that eplb reaches, with at
    least eplb's colocation there."""
    from placement.metrics import colocation, imbalance

    G, N, E, L = spec.num_gpus, spec.num_nodes, graph.num_experts, graph.num_layers
    limit = 1.0 + spec.balance_eps + 1e-9
    load_LE = graph.load_LE.astype(np.float64)

    def score(phy: np.ndarray) -> tuple[bool, float]:
        plan = Plan(G, N, E, graph.meta.layers, phy)
        return imbalance(plan, graph)[1] <= limit, colocation(plan, graph)

    ok, coloc = score(phy2log_LP)
    start_ok, start_coloc = score(start_LP)
    if not start_ok or (ok and coloc >= start_coloc):
        return phy2log_LP
    if spec.num_redundant == 0:
        gpu_LE = np.empty((L, E), dtype=np.int64)
        np.put_along_axis(gpu_LE, start_LP, np.broadcast_to(np.arange(E) // (E // G), (L, E)), axis=1)
        share_LE = load_LE / np.maximum(load_LE.sum(axis=1, keepdims=True), 1e-12)
        trans = graph.trans_LEE.astype(np.float64)
        W_LEG = neighbour_weights(gpu_LE, trans, G)
        temp0 = max(float(spec.options.get("anneal_temp", 0.02)) * float(W_LEG.sum(axis=2).mean()), 1e-9)
        node_w = spec.inter_node_cost - 1.0 if N > 1 else 0.0
        model = (share_LE, np.zeros((L, 1, 1)), 0.0, limit, np.arange(G) // (G // N), node_w)
        anneal_until(gpu_LE, W_LEG, trans, model, deadline, temp0, 0, spec)
        grown_LP = gpu_of_expert_to_phy2log(gpu_LE, G)
        grown_ok, grown_coloc = score(grown_LP)
        if grown_ok and grown_coloc >= start_coloc:
            start_LP, start_coloc = grown_LP, grown_coloc
    info["from_eplb"] = True
    return start_LP if not ok or start_coloc > coloc else phy2log_LP


def eplb_start(eplb_LP: np.ndarray, graph: RoutingGraph, num_gpus: int, limit: float) -> np.ndarray:
    """EPLB's plan with no two copies of one expert on a GPU, the better balanced of: each second copy swaps
    slots with an expert of another GPU (the expert keeps its copies, now on more GPUs), or becomes a copy of
    another expert; then GPUs still over ``limit`` swap single-copy experts."""
    from placement.metrics import imbalance
    from placement.solvers.replicate import distinct_copies, robust_repair, separate_slots

    if eplb_LP.shape[1] == graph.num_experts:
        return eplb_LP
    load_LE = graph.load_LE.astype(np.float64)
    share_LE = load_LE / np.maximum(load_LE.sum(axis=1, keepdims=True), 1e-12)
    L, E = share_LE.shape
    fitted = LoadModel(share_LE, np.zeros((L, E, E)), 0.0)
    trans = graph.trans_LEE.astype(np.float64)
    best_LP, best = eplb_LP, np.inf
    for moved_LP in (separate_slots(eplb_LP, load_LE, num_gpus), distinct_copies(eplb_LP, load_LE, num_gpus)):
        out_LP = distinct_copies(robust_repair(moved_LP, trans, fitted, num_gpus, limit), load_LE, num_gpus)
        worst = imbalance(Plan(num_gpus, 1, E, graph.meta.layers, out_LP), graph)[1]
        if worst < best:
            best_LP, best = out_LP, worst
    return best_LP


def solve_for_unseen(
    graph: RoutingGraph,
    spec: PlanSpec,
    kappa_max: float = 4.0,
    steps: int = 5,
    target: float | None = None,
    budget: float | None = None,
    closest: bool = False,
) -> SolveResult:
    """Most co-located plan whose forecast imbalance_max on unseen prompts (median, placement/solvers/robust.py)
    is <= ``target`` (default 1 + eps; the fitted prompts are held to 1 + eps): a search on the robustness kappa
    (Illinois regula falsi on the forecast), up to ``steps`` solves sharing ``budget`` seconds (default the time
    limit); a solve starts only while one as long as the longest so far fits in the budget (at DeepSeek-V3 size
    a solve overruns its share), except that without ``closest`` both ends are always tried. Raises PlanError
    when even ``kappa_max`` misses the target, naming the forecast reached; with ``closest`` it returns the plan
    of the lowest forecast tried instead (info ``unseen_target_missed``)."""
    if graph.fold_load_SLE is None:
        raise PlanError("--unseen needs prompt ids in the trace (seq_id) to forecast unseen prompts")
    t0 = time.perf_counter()
    target = 1.0 + spec.balance_eps if target is None else target
    per_solve = float(spec.time_limit if budget is None else budget) / steps
    end = t0 + per_solve * steps
    tried: list[tuple[float, float, SolveResult]] = []
    took: list[float] = []

    def room() -> bool:  # time for one more solve as long as the longest so far (large models overrun per_solve)
        return time.perf_counter() + max(took, default=0.0) <= end + 0.25 * per_solve

    def attempt(kappa: float) -> float:
        sub = replace(spec, options={**spec.options, "unseen": False, "kappa": kappa})
        start = time.perf_counter()
        try:
            res = solve_fixed(graph, sub, max(min(start + per_solve, end), start + 0.25 * per_solve))
        except PlanError:  # not even the fitted prompts could be balanced this tightly
            return float("inf")
        finally:
            took.append(time.perf_counter() - start)
        plan = Plan(spec.num_gpus, spec.num_nodes, graph.num_experts, graph.meta.layers, res.phy2log_LP)
        fc = predict_unseen_imbalance(plan, graph.load_LE, graph.fold_load_SLE, seed=spec.seed)
        if fc is None:
            raise PlanError("--unseen needs at least 8 prompt folds (more prompts in the trace)")
        tried.append((kappa, fc["p50"], res))
        return float(fc["p50"])

    lo, hi = 0.0, kappa_max
    f_lo = attempt(lo)
    if f_lo > target:
        f_hi = attempt(hi) if room() or not closest else float("inf")
        if f_hi > target and closest and tried:
            kappa, _, best = min(tried, key=lambda t: t[1])
            info = {**best.info, "unseen_target": target, "unseen_target_missed": True, "kappa": kappa}
            info["kappa_tried"] = [[k, p] for k, p, _ in tried]
            return replace(best, solve_seconds=time.perf_counter() - t0, info=info)
        if f_hi > target:
            reached = f"{min(t[1] for t in tried):.3f}" if tried else "none (the fitted prompts miss it already)"
            raise PlanError(
                f"--balance {target - 1:g} on unseen prompts was not reached: forecast median imbalance "
                f"{reached} at robustness up to {kappa_max:g}; raise --balance"
                + (" or add --redundant slots" if spec.num_redundant == 0 else "")
            )
        # Illinois regula falsi on h(kappa) = forecast - target: an end kept twice in a row has its h halved,
        # so a forecast that falls steeply at small kappa does not pin the steps to the high end.
        h_lo, h_hi, kept = f_lo - target, f_hi - target, 0
        for _ in range(steps - 2):
            if not room():  # solves overran: stop refining
                break
            frac = h_lo / (h_lo - h_hi) if np.isfinite(h_lo) else 0.5
            mid = lo + min(max(frac, 0.05), 0.95) * (hi - lo)
            h_mid = attempt(mid) - target
            if h_mid > 0:
                lo, h_lo = mid, h_mid
                h_hi, kept = (h_hi / 2 if kept == 1 else h_hi), 1
            else:
                hi, h_hi = mid, h_mid
                h_lo, kept = (h_lo / 2 if kept == -1 else h_lo), -1
    kappa, _, best = max((t for t in tried if t[1] <= target), key=lambda t: t[2].info["colocated_fit"])
    info = {**best.info, "unseen_target": target, "kappa": kappa, "kappa_tried": [[k, p] for k, p, _ in tried]}
    return replace(best, solve_seconds=time.perf_counter() - t0, info=info)
