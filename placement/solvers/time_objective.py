"""``--objective time``: the plan with the lowest predicted step time (placement/timemodel.py), not the most
co-located one at a given balance, found within ONE time limit.

Candidates, all for the same GPUs, nodes and slots, are solved and scored in this order while ``spec.time_limit``
lasts (it covers them all, their forecasts included):

1. contiguous and eplb (milliseconds; always scored, so there is always a plan);
2. affinity at eplb's fitted balance, with ``FIT_SHARE`` of the time left as its deadline: the cheapest affinity
   candidate and the default's own first solve (on the DeepSeek-V3 shape of benchmarks/bench_time.py, where the
   default ends on EPLB's plan, it is the fastest plan; docs/benchmarks.md);
3. the affinity default (as balanced on unseen prompts as eplb, then co-located;
   placement/solvers/balance_target.py), with ``DEFAULT_SHARE`` of the time left as its limit, if that holds
   at least as long as step 2's solve took;
4. affinity at the fixed balances ``TIME_BALANCES``, which trade balance for colocation further, sharing what
   is left; each starts only if the time left holds the longest affinity solve so far plus one forecast.

Every solve runs under a hard deadline (placement/solvers/deadline.py): the default at the end of its share, the
others at the end of the limit less one forecast; a solve still running then stops and is no candidate. Each
candidate is scored by ``forecast_time`` (a step of unseen prompts resampled from the prompt folds; the trace
itself without prompt ids) and the lowest predicted step time wins. The result lists every candidate scored
(``info["time"]``), those skipped or stopped and why (``info["time_skipped"]``), and a lower bound on any plan's
predicted step (``info["time_bound_s"]``: compute at perfect balance, no all-to-all, ``step_time_bound``) with the
chosen plan's gap to it (``info["time_gap"]``).

Dimension key: L layers, P slots.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from placement.graph import RoutingGraph
from placement.plan import Plan, PlanError
from placement.solvers.base import PlanSpec, SolveResult
from placement.solvers.deadline import SolveTimeout, hard_deadline
from placement.timemodel import HardwarePreset, ModelDims, check_topology, forecast_time, step_time_bound

FIT_SHARE = 0.15  # of the time left after the baselines: affinity at eplb's fitted balance (its own deadline)
DEFAULT_SHARE = 0.5  # of the time left after that: the affinity default
TIME_BALANCES = (0.1, 0.05, 0.2)  # then these, in this order, sharing what is left


def time_inputs(spec: PlanSpec) -> tuple[HardwarePreset, ModelDims]:
    """The hardware and model dims that the CLI put into ``spec.options`` (as JSON)."""
    hw_json, dims_json = spec.options.get("hardware"), spec.options.get("model_dims")
    if not isinstance(hw_json, str) or not isinstance(dims_json, str):
        raise PlanError("--objective time needs options 'hardware' and 'model_dims' (HardwarePreset / ModelDims JSON)")
    return HardwarePreset.from_json(hw_json), ModelDims.from_json(dims_json)


def solve_time(graph: RoutingGraph, spec: PlanSpec) -> SolveResult:
    """The candidate plan with the lowest forecast step time, all within ``spec.time_limit``; see the module
    docstring. ``info["time"]`` lists every candidate's predicted per-layer mean and max and step total
    (seconds) and its solve seconds, forecast included. BLAS runs on one thread, as in the affinity solver: the
    forecasts' products are small (G x E), and on a busy 2-core machine threaded BLAS made a DeepSeek-V3-shape
    forecast 3x slower (3.2 s against 1.1 s)."""
    with threadpool_limits(limits=1, user_api="blas"):
        return _solve_time(graph, spec)


def _solve_time(graph: RoutingGraph, spec: PlanSpec) -> SolveResult:
    from placement.solvers.affinity import solve_fixed
    from placement.solvers.balance_target import eplb_fitted_eps, solve_auto
    from placement.solvers.baselines import contiguous_phy2log, eplb_phy2log

    t0 = time.perf_counter()
    hw, dims = time_inputs(spec)
    check_topology(spec.num_gpus, spec.num_nodes, hw)
    G, N, E = spec.num_gpus, spec.num_nodes, graph.num_experts
    P = E + spec.num_redundant
    load_LE = graph.load_LE.astype(np.float64)
    end = t0 + float(spec.time_limit)
    plain = replace(spec, auto_balance=False, options={**spec.options, "unseen": False, "kappa": 0.0})
    rows: list[dict[str, Any]] = []
    results: list[SolveResult] = []
    skipped: list[dict[str, str]] = []
    forecast_s: list[float] = []

    def score(name: str, res: SolveResult, started: float) -> None:
        t1 = time.perf_counter()
        plan = Plan(G, N, E, graph.meta.layers, res.phy2log_LP)
        summary = forecast_time(plan, graph, hw, dims, seed=spec.seed).summary()
        forecast_s.append(time.perf_counter() - t1)
        rows.append({"name": name, **summary, "solve_s": round(time.perf_counter() - started, 3)})
        results.append(res)

    def attempt(name: str, solve: Callable[[], SolveResult], until: float, need: float = 0.0) -> float:
        """Solve and score one candidate under a hard deadline at ``until`` (at the latest the limit less one
        forecast) if that leaves ``need`` seconds; the seconds its solve took."""
        until = min(until, end - max(forecast_s))
        if until - time.perf_counter() < max(need, 0.0):
            skipped.append({"name": name, "why": f"no time left ({max(end - time.perf_counter(), 0.0):.1f} s)"})
            return 0.0
        started = time.perf_counter()
        try:
            with hard_deadline(until):
                res = solve()
        except SolveTimeout:
            why = f"stopped at its deadline after {time.perf_counter() - started:.1f} s"
            skipped.append({"name": name, "why": why})
        except PlanError as exc:  # a fixed balance out of reach: no candidate
            skipped.append({"name": name, "why": str(exc).split(";")[0]})
        else:
            took = time.perf_counter() - started
            score(name, res, started)
            return took
        return time.perf_counter() - started

    t1 = time.perf_counter()
    score("contiguous", SolveResult(contiguous_phy2log(load_LE, P, G), "contiguous", "heuristic"), t1)
    t1 = time.perf_counter()
    score("eplb", SolveResult(eplb_phy2log(load_LE, P, G, N), "eplb", "heuristic"), t1)
    fit_eps = eplb_fitted_eps(graph, spec)
    left = end - time.perf_counter() - max(forecast_s)
    fixed = partial(solve_fixed, graph, replace(plain, balance_eps=fit_eps), time.perf_counter() + FIT_SHARE * left)
    fit_s = attempt(f"affinity balance {fit_eps:.3g}", fixed, end)
    share = DEFAULT_SHARE * (end - time.perf_counter() - max(forecast_s))
    default = partial(solve_auto, graph, replace(plain, auto_balance=True, time_limit=share))
    attempt("affinity default", default, time.perf_counter() + share, need=fit_s)  # it starts with that solve
    balances = [b for b in TIME_BALANCES if b > fit_eps + 0.01]
    took = [fit_s]
    for i, eps in enumerate(balances):
        per = (end - time.perf_counter()) / (len(balances) - i) - max(forecast_s)
        fixed = partial(solve_fixed, graph, replace(plain, balance_eps=eps), time.perf_counter() + per)
        took.append(attempt(f"affinity balance {eps:.3g}", fixed, end, need=max(took)))
    best = min(range(len(rows)), key=lambda k: rows[k]["step_s"])
    bound = step_time_bound(graph, G, hw, dims)
    info = {
        "objective": "time",
        "chosen_info": results[best].info,
        "time_choice": rows[best]["name"],
        "time": rows,
        "time_skipped": skipped,
        "time_bound_s": bound,
        "time_gap": round(1.0 - bound / rows[best]["step_s"], 4) if rows[best]["step_s"] > 0 else 0.0,
        "hardware": hw.name,
        "model_dims": {"hidden_size": dims.hidden_size, "expert_ffn_size": dims.expert_ffn_size, "source": dims.source},
        "tokens_per_step": dims.step_tokens(G),
    }
    return replace(results[best], solve_seconds=time.perf_counter() - t0, info=info)
