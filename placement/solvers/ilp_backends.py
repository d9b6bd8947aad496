"""Backends of the exact placement model: the solver-neutral 0/1 model and its CP-SAT, CBC and HiGHS solvers.

``MipModel`` holds a maximisation over binary variables with sparse rows (lo <= a.x <= hi); ``solve`` runs one
backend under a wall-clock limit and returns a ``MipSolution`` with status, objective and the best bound.
Traps handled here: PuLP reports "Optimal" on a time-out (we read ``sol_status``), CBC overruns its own
``timeLimit`` (we run the binary ourselves and kill it at the deadline), CP-SAT needs ``stop_search`` from a
timer to honour the deadline while building.

Dimension key: V variables, R rows, Z nonzeros.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from placement.plan import PlanError

__all__ = ["BACKENDS", "MipModel", "MipSolution", "solve"]

BACKENDS = {"cpsat": "ilp-cpsat", "pulp": "ilp-cbc", "cbc": "ilp-cbc", "highs": "ilp-highs"}


@dataclass(frozen=True)
class MipModel:
    """max obj_V · v  s.t.  lo_R <= A v <= hi_R, v in [0, 1] (integer where integer_V); A in COO (row, col, coef).

    Decoding data: ``x_LEG`` (assign: variable of x[l, e, g]) or ``p_LB`` with ``blocks_BK`` (chain: variable
    of p[l, b], -1 where block b exceeds the cap of layer l).
    """

    kind: str
    names_V: list[str]
    integer_V: np.ndarray
    obj_V: np.ndarray
    row_Z: np.ndarray
    col_Z: np.ndarray
    coef_Z: np.ndarray
    lo_R: np.ndarray
    hi_R: np.ndarray
    hint_V: np.ndarray | None
    base_cost: float
    dropped_gain: float
    num_gpus: int
    x_LEG: np.ndarray | None = None
    p_LB: np.ndarray | None = None
    blocks_BK: np.ndarray | None = None
    trans_XEE: np.ndarray | None = None

    @property
    def num_vars(self) -> int:
        return len(self.names_V)

    def cost_bound(self, gain_bound: float) -> float:
        """Lower bound on topology cost from an upper bound on the model's gain (pairs left out count fully)."""
        return self.base_cost - gain_bound - self.dropped_gain


@dataclass(frozen=True)
class MipSolution:
    """What a backend found: status optimal | feasible | infeasible | unknown; values and gain bound or None."""

    status: str
    values_V: np.ndarray | None
    gain_bound: float | None
    info: dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- backends


class _OutOfTime(Exception):
    """Building the backend's model used up the time limit."""


def _rows(model: MipModel, deadline: float = np.inf) -> Iterator[tuple[np.ndarray, np.ndarray, float, float]]:
    """(cols, coefs, lo, hi) of each row; raises ``_OutOfTime`` once ``deadline`` (perf_counter) has passed."""
    order = np.argsort(model.row_Z, kind="stable")
    bounds = np.searchsorted(model.row_Z[order], np.arange(len(model.lo_R) + 1)).tolist()
    col, coef = model.col_Z[order], model.coef_Z[order]
    for r, (lo, hi) in enumerate(zip(model.lo_R.tolist(), model.hi_R.tolist(), strict=True)):
        if r % 256 == 0 and time.perf_counter() > deadline:
            raise _OutOfTime
        yield col[bounds[r] : bounds[r + 1]], coef[bounds[r] : bounds[r + 1]], lo, hi


def _solve_cpsat(model: MipModel, deadline: float, seed: int, workers: int) -> MipSolution:
    """CP-SAT; a timer calls ``stop_search`` at the deadline in case presolve overruns its time limit."""
    import threading

    from ortools.sat.python import cp_model

    cp = cp_model.CpModel()
    v = [cp.new_bool_var(n) for n in model.names_V]
    for cols, coefs, lo, hi in _rows(model, deadline - 0.2):
        span = int(np.abs(coefs).sum())
        lo_i = -span if np.isinf(lo) else int(np.ceil(lo - 1e-9))
        hi_i = span if np.isinf(hi) else int(np.floor(hi + 1e-9))
        cp.add_linear_constraint(cp_model.LinearExpr.weighted_sum([v[c] for c in cols], coefs.astype(int).tolist()),
                                 lo_i, hi_i)  # fmt: skip
    nz = np.flatnonzero(model.obj_V)
    cp.maximize(cp_model.LinearExpr.weighted_sum([v[i] for i in nz], model.obj_V[nz].tolist()))
    if model.hint_V is not None:
        for i, h in enumerate(model.hint_V.tolist()):
            cp.add_hint(v[i], int(h > 0.5))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(deadline - time.perf_counter() - 0.3, 0.01)
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    # The bound comes from the LP relaxation (tight for the chain model): run the full-LP worker, skip probing.
    solver.parameters.linearization_level = 2
    solver.parameters.cp_model_probing_level = 0
    if workers > 1:
        solver.parameters.subsolvers.append("max_lp")
    timer = threading.Timer(max(deadline - time.perf_counter() - 0.15, 0.0), solver.stop_search)
    timer.start()
    try:
        st = solver.solve(cp)
    finally:
        timer.cancel()
    info = {"cpsat_status": solver.status_name(st), "branches": solver.num_branches}
    if st in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        # Variables were created first, in order, so the response's solution vector starts with them
        # (reading 10^6 values one by one through boolean_value() takes seconds past the deadline).
        vals = np.asarray(solver.response_proto.solution, dtype=np.float64)[: len(v)]
        status = "optimal" if st == cp_model.OPTIMAL else "feasible"
        return MipSolution(status, vals, float(solver.best_objective_bound), info)
    if st == cp_model.INFEASIBLE:
        return MipSolution("infeasible", None, None, info)
    if st == cp_model.MODEL_INVALID:
        raise RuntimeError(f"CP-SAT rejected the placement model: {cp.validate()}")
    return MipSolution("unknown", None, None, info)  # no bound: CP-SAT's is not meaningful without a solution


def _pulp_problem(model: MipModel, deadline: float) -> tuple[Any, list[Any]]:
    import pulp

    prob = pulp.LpProblem("moeplace_ilp", pulp.LpMaximize)
    v = [
        pulp.LpVariable(n, 0, 1, pulp.LpBinary if i else pulp.LpContinuous)
        for n, i in zip(model.names_V, model.integer_V.tolist(), strict=True)
    ]
    if time.perf_counter() > deadline:
        raise _OutOfTime
    nz = np.flatnonzero(model.obj_V)
    prob += pulp.LpAffineExpression([(v[i], float(model.obj_V[i])) for i in nz])
    for r, (cols, coefs, lo, hi) in enumerate(_rows(model, deadline)):
        expr = pulp.LpAffineExpression([(v[c], float(a)) for c, a in zip(cols, coefs, strict=True)])
        if lo == hi:
            prob += (expr == float(lo), f"r{r}")
            continue
        if np.isfinite(hi):
            prob += (expr <= float(hi), f"r{r}u")
        if np.isfinite(lo):
            prob += (expr >= float(lo), f"r{r}l")
    if model.hint_V is not None:
        for var, h in zip(v, model.hint_V.tolist(), strict=True):
            var.setInitialValue(h)
    return prob, v


def _solve_cbc(model: MipModel, deadline: float, seed: int) -> MipSolution:
    """CBC as a child process with a hard wall-clock kill (CBC overruns ``-sec``). PuLP reports "Optimal" on a
    time-out, so the status comes from ``sol_status``; the bound comes from CBC's log."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import pulp

    t0 = time.perf_counter()
    prob, v = _pulp_problem(model, t0 + 0.4 * (deadline - t0))  # writing the MPS file takes about as long
    cbc = pulp.PULP_CBC_CMD(msg=False, warmStart=model.hint_V is not None)
    with tempfile.TemporaryDirectory(prefix="moeplace-cbc-") as tmp:
        mps, mst, sol = (str(Path(tmp) / f"m.{ext}") for ext in ("mps", "mst", "sol"))
        vs, var_names, con_names, _ = prob.writeMPS(mps, rename=1)
        args = [cbc.path, mps, "-max"]
        if model.hint_V is not None:
            cbc.writesol(mst, prob, vs, var_names, con_names)
            args += ["-mips", mst]
        left = deadline - time.perf_counter()
        if left < 0.2:
            raise _OutOfTime
        args += ["-sec", f"{max(0.8 * left - 0.2, 0.05):.2f}", "-timeMode", "elapsed", "-randomCbcSeed",
                 str(seed + 1), "-solve", "-printingOptions", "all", "-solution", sol]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True)  # fmt: skip
        try:
            log, _ = proc.communicate(timeout=max(deadline - time.perf_counter(), 0.05))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return MipSolution("unknown", None, None, {"cbc": "killed at the wall-clock limit"})
        if not Path(sol).exists():
            raise RuntimeError(f"CBC wrote no solution file (exit {proc.returncode}): {log[-300:]}")
        status, values, *_rest, sol_status = cbc.readsol_MPS(sol, prob, vs, var_names, con_names)
    info: dict[str, object] = {"cbc_status": pulp.LpStatus[status], "cbc_sol_status": sol_status}
    if status == pulp.LpStatusInfeasible:
        return MipSolution("infeasible", None, None, info)
    if sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return MipSolution("unknown", None, None, info)
    vals = np.array([values.get(x.name, 0.0) or 0.0 for x in v], dtype=np.float64)
    gain = float(model.obj_V @ vals)
    if sol_status == pulp.LpSolutionOptimal:
        return MipSolution("optimal", vals, gain, info)
    # CBC minimises the negated objective; its "best possible" / "Lower bound" is -(upper bound on the gain).
    found = re.findall(r"best possible (-?[\d.e+]+)|Lower bound:\s+(-?[\d.e+]+)", log)
    bound = None
    if found:
        a, b = found[-1]
        bound = max(abs(float(a or b)), gain)
    return MipSolution("feasible", vals, bound, info)


def _solve_highs(model: MipModel, deadline: float, seed: int) -> MipSolution:
    """HiGHS in process through PuLP's highspy API (it keeps its time limit; no hard kill possible)."""
    import pulp

    if not pulp.HiGHS().available():
        raise PlanError("ilp_backend=highs needs highspy (pip install highspy); use ilp_backend=cpsat or pulp")
    t0 = time.perf_counter()
    prob, v = _pulp_problem(model, t0 + 0.4 * (deadline - t0))
    left = max(0.6 * (deadline - time.perf_counter()) - 0.1, 0.05)  # it builds its own model inside
    solver = pulp.HiGHS(msg=False, timeLimit=left, threads=1, random_seed=seed)
    prob.solve(solver)
    info: dict[str, object] = {"highs_status": pulp.LpStatus[prob.status]}
    if prob.status == pulp.LpStatusInfeasible:
        return MipSolution("infeasible", None, None, info)
    bound_raw = prob.solverModel.getInfo().mip_dual_bound
    bound = -float(bound_raw) if np.isfinite(bound_raw) else None  # HiGHS minimised -gain
    if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return MipSolution("unknown", None, bound, info)
    vals = np.array([x.value() or 0.0 for x in v], dtype=np.float64)
    optimal = prob.sol_status == pulp.LpSolutionOptimal
    return MipSolution(
        "optimal" if optimal else "feasible", vals, float(model.obj_V @ vals) if optimal else bound, info
    )


def solve(model: MipModel, backend: str, time_limit: float, seed: int = 0, workers: int = 2) -> MipSolution:
    """Solve ``model`` with ``backend`` (cpsat | pulp | cbc | highs) within ``time_limit`` seconds (wall clock);
    status "unknown" without values when building the backend's model alone used up the time."""
    deadline = time.perf_counter() + time_limit
    try:
        if backend == "cpsat":
            return _solve_cpsat(model, deadline, seed, workers)
        if backend in ("pulp", "cbc"):
            return _solve_cbc(model, deadline, seed)
        if backend == "highs":
            return _solve_highs(model, deadline, seed)
    except _OutOfTime:
        return MipSolution("unknown", None, None, {"note": f"building the {backend} model used up the time limit"})
    raise PlanError(f"ilp_backend={backend!r}: choose one of {', '.join(BACKENDS)}")
