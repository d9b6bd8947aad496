"""Exact expert placement: a 0/1 model built once in solver-neutral form, solved by CP-SAT, CBC or HiGHS.

The problem (one replica per expert): put each expert of each layer on one GPU, E/G experts per GPU per layer,
each GPU's load per layer <= cap[l] = (1 + eps) * mean, minimising ``placement.planner.topology_cost``:
trans[l, i, j] times 0 (same GPU), 1 (same node) or ``inter_node_cost`` (other node). Every model maximises
the *gain* (weighted colocation); cost = base - gain with base = (1 or inter_node_cost) * total traffic.

Two formulations of the same problem:

- ``chain`` (one node; the default where it is small): GPUs have no identity across layers — only which experts
  share a GPU (a *block*, E/G experts within the cap) and which block of layer l+1 sits with which block of
  layer l. p[l, b] = 1 if block b is a GPU of layer l; q[l, b, c] = 1 if blocks b (layer l) and c (layer l+1)
  share a GPU. Flow conservation ties q to p. The LP relaxation is a layered transportation problem over
  set partitions: much tighter than the y-linearisation, with no GPU symmetry left.
- ``assign`` (general, nodes): x[l, e, g]; y[l, i, j, g] <= x[l, i, g], x[l+1, j, g] for the kept pairs (i, j)
  (``ilp_top_pairs`` heaviest next-layer partners of each expert); yn the same for nodes; capacity cuts
  (expert i colocates with at most E/G experts of the next layer); GPU (and node) symmetry broken on layer 0.

Options (``spec.options``): ``ilp_backend`` cpsat | pulp (CBC) | highs; ``ilp_formulation`` auto | chain |
assign; ``ilp_top_pairs`` int; ``ilp_workers`` (CP-SAT, default 2); ``ilp_chain_max_vars`` (default 300000).

Dimension key: L layers, X layer pairs, E experts, G GPUs, N nodes, B blocks, K experts per block,
V variables, R rows, Z nonzeros.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from placement.graph import RoutingGraph, keep_top_per_row
from placement.plan import PlanError, gpu_of_expert_to_phy2log
from placement.solvers.base import PlanSpec, SolveResult, relative_gap
from placement.solvers.greedy import balance_cap_L, distance_GG, gpu_cost, greedy_gpu_of
from placement.solvers.ilp_backends import BACKENDS, MipModel, MipSolution, solve

__all__ = ["MipModel", "MipSolution", "ModelBuilder", "add_capacity_cuts", "build_model", "solve", "solve_ilp"]


class _Builder:
    """Accumulates variables and COO rows."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.integer: list[np.ndarray] = []
        self.obj: list[np.ndarray] = []
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.lo: list[np.ndarray] = []
        self.hi: list[np.ndarray] = []
        self.num_rows = 0

    def add_vars(self, prefix: str, keys: np.ndarray, integer: bool, obj: np.ndarray | float = 0.0) -> np.ndarray:
        """One variable per row of ``keys`` (named prefix_k0_k1...); returns their indices."""
        keys = np.atleast_2d(keys.T).T if keys.ndim == 1 else keys
        first = len(self.names)
        self.names.extend(f"{prefix}_" + "_".join(map(str, k)) for k in keys.tolist())
        n = len(self.names) - first
        self.integer.append(np.full(n, integer))
        self.obj.append(np.broadcast_to(np.asarray(obj, dtype=np.float64), (n,)).copy())
        return np.arange(first, first + n)

    def add_rows(self, row_Z: np.ndarray, col_Z: np.ndarray, coef_Z: object, lo_R: object, hi_R: object) -> None:
        """Rows lo <= sum coef * v[col] <= hi; ``row_Z`` numbers the new rows from 0."""
        n = int(row_Z.max()) + 1 if row_Z.size else 0
        self.rows.append((row_Z + self.num_rows, col_Z, np.broadcast_to(np.asarray(coef_Z, np.float64), col_Z.shape)))
        self.lo.append(np.broadcast_to(np.asarray(lo_R, dtype=np.float64), (n,)).copy())
        self.hi.append(np.broadcast_to(np.asarray(hi_R, dtype=np.float64), (n,)).copy())
        self.num_rows += n

    def add_dense_rows(self, cols_RK: np.ndarray, coef_RK: np.ndarray | float, lo_R: object, hi_R: object) -> None:
        R, K = cols_RK.shape
        coef = np.broadcast_to(np.asarray(coef_RK, dtype=np.float64), (R, K))
        self.add_rows(np.repeat(np.arange(R), K), cols_RK.reshape(-1), coef.reshape(-1), lo_R, hi_R)

    def arrays(self) -> dict[str, np.ndarray]:
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
        return {
            "integer_V": cat(self.integer).astype(bool),
            "obj_V": cat(self.obj),
            "row_Z": cat([r[0] for r in self.rows]).astype(np.int64),
            "col_Z": cat([r[1] for r in self.rows]).astype(np.int64),
            "coef_Z": cat([r[2] for r in self.rows]),
            "lo_R": cat(self.lo),
            "hi_R": cat(self.hi),
        }


# ------------------------------------------------------------------------------------------ formulations


def _blocks(num_experts: int, per_gpu: int) -> np.ndarray:
    return np.array(list(itertools.combinations(range(num_experts), per_gpu)), dtype=np.int64).reshape(-1, per_gpu)


def chain_num_vars(graph: RoutingGraph, spec: PlanSpec) -> int:
    """Variables of the chain formulation (p and q), counting only blocks within the cap."""
    E, G = graph.num_experts, spec.num_gpus
    if math.comb(E, E // G) > 20_000:
        return math.comb(E, E // G) ** 2
    blocks_BK = _blocks(E, E // G)
    cap_L = balance_cap_L(graph.load_LE, G, spec.balance_eps)
    nok_L = (graph.load_LE[:, blocks_BK].sum(axis=2) <= cap_L[:, None] + 1e-9).sum(axis=1)
    return int(nok_L.sum() + (nok_L[:-1] * nok_L[1:]).sum())


def _build_chain(graph: RoutingGraph, spec: PlanSpec, hint_LE: np.ndarray | None) -> MipModel:
    E, G, L = graph.num_experts, spec.num_gpus, graph.num_layers
    blocks_BK = _blocks(E, E // G)
    B = blocks_BK.shape[0]
    member_BE = np.zeros((B, E))
    member_BE[np.repeat(np.arange(B), E // G), blocks_BK.reshape(-1)] = 1.0
    trans = graph.trans_LEE.astype(np.float64)
    cap_L = balance_cap_L(graph.load_LE, G, spec.balance_eps)
    ok_LB = graph.load_LE[:, blocks_BK].sum(axis=2) <= cap_L[:, None] + 1e-9
    w_XBB = np.einsum("be,xef,cf->xbc", member_BE, trans, member_BE)
    m = _Builder()

    # Variables: p[l, b] (block b is one GPU of layer l), q[x, b, c] (b of layer x and c of x+1 share a GPU).
    p_LB = np.full((L, B), -1, dtype=np.int64)
    p_LB[ok_LB] = m.add_vars("p", np.argwhere(ok_LB), True)
    q_key = np.argwhere(ok_LB[:-1, :, None] & ok_LB[1:, None, :])
    x_Q, b_Q, c_Q = q_key.T if q_key.size else (np.zeros(0, np.int64),) * 3
    q_Q = m.add_vars("q", q_key, False, w_XBB[x_Q, b_Q, c_Q])

    # Constraints. Each expert of each layer is in exactly one chosen block.
    lb_, bb_ = np.nonzero(ok_LB)
    k = blocks_BK.shape[1]
    m.add_rows(np.repeat(lb_ * E, k) + blocks_BK[bb_].reshape(-1), np.repeat(p_LB[lb_, bb_], k), 1.0, 1.0, 1.0)
    # A chosen block of layer l shares its GPU with exactly one block of layer l+1, and vice versa.
    for out_side, own_b in ((True, b_Q), (False, c_Q)):
        side_ok = ok_LB[:-1] if out_side else ok_LB[1:]
        rid_XB = np.full(side_ok.shape, -1, dtype=np.int64)
        rid_XB[side_ok] = np.arange(int(side_ok.sum()))
        rx, rb = np.nonzero(side_ok)
        p_R = p_LB[rx, rb] if out_side else p_LB[rx + 1, rb]
        m.add_rows(
            np.concatenate([rid_XB[x_Q, own_b], np.arange(len(rx))]),
            np.concatenate([q_Q, p_R]),
            np.concatenate([np.ones(len(q_Q)), -np.ones(len(rx))]),
            0.0,
            0.0,
        )

    hint_V = None
    if hint_LE is not None:
        index = {tuple(b): i for i, b in enumerate(blocks_BK.tolist())}
        gb_LG = np.array([[index[tuple(np.flatnonzero(hint_LE[l] == g).tolist())] for g in range(G)] for l in range(L)])
        hint_V = np.zeros(len(m.names))
        hp = p_LB[np.arange(L)[:, None], gb_LG]
        hint_V[hp[hp >= 0]] = 1.0
        qidx = {(int(a), int(b), int(c)): int(v) for a, b, c, v in zip(x_Q, b_Q, c_Q, q_Q, strict=True)}
        for x in range(L - 1):
            for g in range(G):
                v = qidx.get((x, int(gb_LG[x, g]), int(gb_LG[x + 1, g])))
                if v is not None:
                    hint_V[v] = 1.0
    return MipModel(
        "chain", m.names, **m.arrays(), hint_V=hint_V, base_cost=float(trans.sum()), dropped_gain=0.0,
        num_gpus=G, p_LB=p_LB, blocks_BK=blocks_BK, trans_XEE=trans,
    )  # fmt: skip


def _build_assign(graph: RoutingGraph, spec: PlanSpec, hint_LE: np.ndarray | None) -> MipModel:
    E, G, N, L = graph.num_experts, spec.num_gpus, spec.num_nodes, graph.num_layers
    k, Gn = E // G, G // N
    c = float(spec.inter_node_cost) if N > 1 else 1.0
    trans = graph.trans_LEE.astype(np.float64)
    top = spec.options.get("ilp_top_pairs")
    kept = keep_top_per_row(trans, int(top)) if top else trans
    cap_L = balance_cap_L(graph.load_LE, G, spec.balance_eps)
    m = _Builder()

    # Variables: x[l, e, g] expert e of layer l on GPU g; y[pair, g] both ends of a kept pair on GPU g;
    # yn[pair, n] both ends on node n (only with several nodes).
    x_LEG = m.add_vars("x", np.indices((L, E, G)).reshape(3, -1).T, True).reshape(L, E, G)
    pl, pi, pj = np.nonzero(kept > 0)
    w_A = kept[pl, pi, pj]
    y_AG = m.add_vars("y", np.stack([np.repeat(pl, G), np.repeat(pi, G), np.repeat(pj, G), np.tile(np.arange(G),
                      len(pl))], 1), False, np.repeat(w_A, G)).reshape(-1, G)  # fmt: skip
    A = len(pl)

    # Constraints. Every expert sits on exactly one GPU.
    m.add_dense_rows(x_LEG.reshape(L * E, G), 1.0, 1.0, 1.0)
    # Every GPU holds E/G experts of each layer.
    m.add_dense_rows(x_LEG.transpose(0, 2, 1).reshape(L * G, E), 1.0, k, k)
    # Every GPU's load of each layer stays within the cap (loads are integers: floor the cap).
    load_LGE = np.broadcast_to(graph.load_LE[:, None, :], (L, G, E)).reshape(L * G, E)
    m.add_dense_rows(x_LEG.transpose(0, 2, 1).reshape(L * G, E), load_LGE, -np.inf,
                     np.repeat(np.floor(cap_L + 1e-9), G))  # fmt: skip
    # A pair can only be colocated on GPU g if both of its experts sit there.
    for x_end in (x_LEG[pl, pi], x_LEG[pl + 1, pj]):
        m.add_dense_rows(np.stack([y_AG, x_end], 2).reshape(-1, 2), np.array([1.0, -1.0]), -np.inf, 0.0)
    # Capacity cuts: an expert shares its GPU with at most E/G experts of the adjacent layer.
    for key_A, xe in ((pl * E + pi, x_LEG[:-1].reshape(-1, G)), (pl * E + pj, x_LEG[1:].reshape(-1, G))):
        _add_capacity_cuts(m, key_A, y_AG, xe, k)
    if N > 1:
        # The same for nodes: yn[pair, n] <= sum of x over the node's GPUs, and the node capacity cut.
        xn_LENG = x_LEG.reshape(L, E, N, Gn)
        keys_AN = np.stack([np.repeat(pl, N), np.repeat(pi, N), np.repeat(pj, N), np.tile(np.arange(N), A)], 1)
        yn_AN = m.add_vars("yn", keys_AN, False, np.repeat((c - 1.0) * w_A, N)).reshape(-1, N)
        for xg in (xn_LENG[pl, pi], xn_LENG[pl + 1, pj]):
            cols = np.concatenate([yn_AN[..., None], xg], axis=2).reshape(-1, Gn + 1)
            m.add_dense_rows(cols, np.array([1.0] + [-1.0] * Gn), -np.inf, 0.0)
        for key_A, xg_KNU in (
            (pl * E + pi, xn_LENG[:-1].reshape(-1, N, Gn)),
            (pl * E + pj, xn_LENG[1:].reshape(-1, N, Gn)),
        ):
            _add_capacity_cuts(m, key_A, yn_AN, xg_KNU, E // N)
    # Symmetry: GPUs of a node (and nodes) are interchangeable, so on layer 0 order the GPUs of each node by
    # their lowest expert, and the nodes by the lowest expert of their first GPU.
    _add_symmetry_rows(m, x_LEG[0], N)

    hint_V = None
    if hint_LE is not None:
        hint_LE = _canonical_labels(hint_LE, N)
        hint_V = np.zeros(len(m.names))
        hint_V[x_LEG[np.arange(L)[:, None], np.arange(E)[None, :], hint_LE]] = 1.0
        gi, gj = hint_LE[pl, pi], hint_LE[pl + 1, pj]
        same = gi == gj
        hint_V[y_AG[np.flatnonzero(same), gi[same]]] = 1.0
        if N > 1:
            ni, nj = gi // Gn, gj // Gn
            hint_V[yn_AN[np.flatnonzero(ni == nj), ni[ni == nj]]] = 1.0
    dropped = float((trans - kept).sum()) * c
    return MipModel(
        "assign", m.names, **m.arrays(), hint_V=hint_V, base_cost=c * float(trans.sum()), dropped_gain=dropped,
        num_gpus=G, x_LEG=x_LEG,
    )  # fmt: skip


def _add_capacity_cuts(m: _Builder, key_A: np.ndarray, y_AU: np.ndarray, x_KU: np.ndarray, cap: int) -> None:
    """For each expert key and unit u: sum of y over its pairs <= cap * x (x_KU[key, u] is a var or var group)."""
    keys, row_A = np.unique(key_A, return_inverse=True)
    U = y_AU.shape[1]
    xs = x_KU[keys].reshape(len(keys), U, -1)
    rid_AU = row_A[:, None] * U + np.arange(U)
    rid_KU = np.arange(len(keys) * U).reshape(len(keys), U)
    m.add_rows(
        np.concatenate([rid_AU.reshape(-1), np.repeat(rid_KU.reshape(-1), xs.shape[2])]),
        np.concatenate([y_AU.reshape(-1), xs.reshape(-1)]),
        np.concatenate([np.ones(y_AU.size), np.full(xs.size, -float(cap))]),
        -np.inf,
        0.0,
    )


# for other exact models built the same way (placement/replan/exact.py)
ModelBuilder = _Builder
add_capacity_cuts = _add_capacity_cuts


def _add_symmetry_rows(m: _Builder, x0_EG: np.ndarray, num_nodes: int) -> None:
    """x[0, e, g] <= sum_{e' < e} x[0, e', prev(g)], prev = previous GPU of the node, or the first GPU of the
    previous node for a node's first GPU; GPU 0 gets expert 0."""
    E, G = x0_EG.shape
    Gn = G // num_nodes
    for g in range(1, G):
        prev = g - 1 if g % Gn else g - Gn
        for e in range(E):
            m.add_rows(np.zeros(e + 1, np.int64), np.concatenate([[x0_EG[e, g]], x0_EG[:e, prev]]),
                       np.concatenate([[1.0], -np.ones(e)]), -np.inf, 0.0)  # fmt: skip


def _canonical_labels(gpu_of_LE: np.ndarray, num_nodes: int) -> np.ndarray:
    """Relabel GPUs (within nodes, and nodes) so that layer 0 meets the symmetry-breaking order."""
    G = int(gpu_of_LE.max()) + 1 if gpu_of_LE.size else 1
    Gn = max(G // num_nodes, 1)
    first_G = np.array([np.flatnonzero(gpu_of_LE[0] == g).min(initial=10**9) for g in range(G)])
    node_order = np.argsort(first_G.reshape(num_nodes, Gn).min(axis=1), kind="stable")
    new_of_old = np.empty(G, dtype=np.int64)
    for new_n, old_n in enumerate(node_order):
        gs = old_n * Gn + np.argsort(first_G[old_n * Gn : (old_n + 1) * Gn], kind="stable")
        new_of_old[gs] = new_n * Gn + np.arange(Gn)
    return new_of_old[gpu_of_LE]


def decode_solution(model: MipModel, v_V: np.ndarray) -> np.ndarray:
    """Variable values -> gpu_of_LE int64 [L, E]."""
    if model.x_LEG is not None:
        return np.asarray(np.argmax(v_V[model.x_LEG], axis=2), dtype=np.int64)
    if model.p_LB is None or model.blocks_BK is None or model.trans_XEE is None:
        raise RuntimeError("chain model without its decoding data")
    return _decode_chain(v_V, model.p_LB, model.blocks_BK, model.trans_XEE, model.num_gpus)


def _decode_chain(v_V: np.ndarray, p_LB: np.ndarray, blocks_BK: np.ndarray, trans: np.ndarray, G: int) -> np.ndarray:
    """Chosen blocks per layer; GPU labels of layer l+1 by the best matching of its blocks to layer l's."""
    from ortools.graph.python import linear_sum_assignment

    L, E = p_LB.shape[0], trans.shape[1]
    gpu_of_LE = np.empty((L, E), dtype=np.int64)
    prev_GK = None
    for l in range(L):
        chosen = np.flatnonzero((p_LB[l] >= 0) & (v_V[np.maximum(p_LB[l], 0)] > 0.5))
        if len(chosen) != G:
            raise RuntimeError(f"chain model decoded {len(chosen)} blocks for layer {l}, expected {G}")
        blk_GK = blocks_BK[chosen]
        if prev_GK is not None:
            w_GG = trans[l - 1][prev_GK[:, :, None, None], blk_GK[None, None, :, :]].sum(axis=(1, 3))
            lsa = linear_sum_assignment.SimpleLinearSumAssignment()
            for a in range(G):
                for b in range(G):
                    lsa.add_arc_with_cost(a, b, -round(float(w_GG[a, b])))
            if lsa.solve() != lsa.OPTIMAL:
                raise RuntimeError("linear sum assignment failed while decoding the chain model")
            blk_GK = blk_GK[[lsa.right_mate(a) for a in range(G)]]
        gpu_of_LE[l, blk_GK.reshape(-1)] = np.repeat(np.arange(G), blk_GK.shape[1])
        prev_GK = blk_GK
    return gpu_of_LE


def build_model(graph: RoutingGraph, spec: PlanSpec, hint_LE: np.ndarray | None = None) -> MipModel:
    """The exact model of ``graph`` under ``spec`` (formulation by ``ilp_formulation``), hinted by ``hint_LE``."""
    form = str(spec.options.get("ilp_formulation", "auto"))
    if form not in ("auto", "chain", "assign"):
        raise PlanError(f"ilp_formulation={form!r}: choose auto, chain or assign")
    if form == "chain" and spec.num_nodes > 1:
        raise PlanError("ilp_formulation=chain models one node; use assign (or auto) with --nodes > 1")
    if form == "auto":
        small = chain_num_vars(graph, spec) <= int(spec.options.get("ilp_chain_max_vars", 300_000))
        form = "chain" if spec.num_nodes == 1 and small else "assign"
    return (_build_chain if form == "chain" else _build_assign)(graph, spec, hint_LE)


# -------------------------------------------------------------------------------------------- entry point


def solve_ilp(graph: RoutingGraph, spec: PlanSpec) -> SolveResult:
    """Exact placement: greedy hint, then the exact model; always returns a balanced plan within the limit."""
    t0 = time.perf_counter()
    spec.validate(graph.num_experts)
    if spec.num_redundant:
        raise PlanError("--solver ilp places one replica per expert; for --redundant use --solver affinity or eplb")
    backend = str(spec.options.get("ilp_backend", "cpsat"))
    if backend not in BACKENDS:
        raise PlanError(f"ilp_backend={backend!r}: choose one of {', '.join(BACKENDS)}")
    G, E = spec.num_gpus, graph.num_experts
    dist_GG = distance_GG(G, spec.num_nodes, spec.inter_node_cost)
    cap_L = balance_cap_L(graph.load_LE, G, spec.balance_eps)

    # Greedy first: a balanced hint (and the answer if the solver finds nothing better in time).
    greedy_LE = greedy_gpu_of(graph, spec)
    over_L = _gpu_load_LG(greedy_LE, graph.load_LE, G).max(axis=1) > cap_L + 1e-9
    greedy_ok = not over_L.any()
    model = build_model(graph, spec, greedy_LE if greedy_ok else None)
    left = spec.time_limit - (time.perf_counter() - t0) - 0.1
    max_vars = int(spec.options.get("ilp_max_vars", 200_000))
    if model.num_vars > max_vars:
        # CP-SAT's presolve on ~10^6 variables does not stop on time (measured: 3 s past a 30 s limit).
        note = f"{model.num_vars:,} variables > ilp_max_vars={max_vars:,}: exact solve skipped; use --solver affinity"
        sol = MipSolution("unknown", None, None, {"note": note})
    else:
        sol = solve(model, backend, left, spec.seed, int(spec.options.get("ilp_workers", 2)))
    if sol.status == "infeasible":
        mean_L = graph.load_LE.sum(axis=1) / G
        need = float((_gpu_load_LG(greedy_LE, graph.load_LE, G).max(axis=1) / mean_L).max() - 1.0)
        raise PlanError(
            f"--balance {spec.balance_eps:g} is infeasible: no placement of {E // G} experts per GPU keeps every "
            f"layer within (1 + eps) * mean (the greedy reaches eps = {need:.3f}); raise --balance"
        )
    if sol.values_V is not None:
        gpu_of_LE, status = decode_solution(model, sol.values_V), sol.status
        if greedy_ok and gpu_cost(greedy_LE, graph.trans_LEE, dist_GG) < gpu_cost(gpu_of_LE, graph.trans_LEE, dist_GG):
            gpu_of_LE = greedy_LE  # a backend that ignored the hint and stopped early
    else:
        if not greedy_ok:
            raise PlanError(
                f"--balance {spec.balance_eps:g}: no balanced placement found within --time-limit "
                f"{spec.time_limit:g} s; raise --balance or the time limit"
            )
        gpu_of_LE, status = greedy_LE, "feasible-greedy"
    objective = gpu_cost(gpu_of_LE, graph.trans_LEE, dist_GG)
    bound = None if sol.gain_bound is None else float(np.clip(model.cost_bound(sol.gain_bound), 0.0, objective))
    if status == "optimal" and model.dropped_gain > 0:
        status = "feasible"  # optimal for the kept pairs only
    info = {
        "backend": backend,
        "formulation": model.kind,
        "num_vars": model.num_vars,
        "num_rows": len(model.lo_R),
        "greedy_objective": gpu_cost(greedy_LE, graph.trans_LEE, dist_GG),
        **sol.info,
    }
    return SolveResult(
        gpu_of_expert_to_phy2log(gpu_of_LE, G), BACKENDS[backend], status, objective, bound,
        relative_gap(objective, bound), time.perf_counter() - t0, info,
    )  # fmt: skip


def _gpu_load_LG(gpu_of_LE: np.ndarray, load_LE: np.ndarray, num_gpus: int) -> np.ndarray:
    L = gpu_of_LE.shape[0]
    out = np.zeros((L, num_gpus))
    np.add.at(out, (np.repeat(np.arange(L), gpu_of_LE.shape[1]), gpu_of_LE.reshape(-1)), load_LE.reshape(-1))
    return out
