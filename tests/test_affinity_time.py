"""The affinity optimiser keeps its wall-clock limit: annealing in re-planned chunks, a search that stops at its
deadline, and the robustness search that starts no solve it has no time for (placement/solvers/affinity.py); the
eplb floor's slot separation scores all its candidate swaps at once (placement/solvers/replicate.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from placement.graph import graph_from_routes
from placement.metrics import imbalance
from placement.plan import Plan
from placement.solvers.affinity import anneal_until, colocated, solve_fixed, solve_for_unseen
from placement.solvers.anneal import neighbour_weights
from placement.solvers.base import PlanSpec
from placement.solvers.baselines import eplb_phy2log
from placement.solvers.layer_assign import assign_layer, repair_balance
from placement.solvers.replicate import separate_slots
from placement.solvers.robust import LoadModel
from placement.trace.synthetic import synthetic_trace


def _layers(L: int, E: int, G: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin_LE with E/G experts per GPU, trans_XEE, share_LE) of a random trace."""
    rng = np.random.default_rng(seed)
    bin_LE = np.stack([rng.permutation(np.arange(E) % G) for _ in range(L)]).astype(np.int64)
    trans_XEE = rng.random((L - 1, E, E)) ** 4
    share_LE = np.full((L, E), 1.0 / E)
    return bin_LE, trans_XEE, share_LE


def test_anneal_until_stops_at_its_deadline_and_improves() -> None:
    L, E, G = 12, 64, 8
    bin_LE, trans, share_LE = _layers(L, E, G)
    model = (share_LE, np.zeros((L, 1, 1)), 0.0, 1.0 + 1e-9, np.zeros(G, dtype=np.int64), 0.0)
    spec = PlanSpec(G, options={"anneal_rate": 1e9})  # a first guess far too high: the chunks must correct it
    before = colocated(bin_LE, trans)
    start = bin_LE.copy()
    W_LEG = neighbour_weights(bin_LE, trans, G)
    assert anneal_until(bin_LE, W_LEG, trans, model, time.perf_counter() - 1, 1.0, 0, spec) == 0
    assert np.array_equal(bin_LE, start)
    warm = bin_LE.copy()  # numba compiles the kernel on its first call in a fresh checkout (seconds): not timed here
    anneal_until(warm, neighbour_weights(warm, trans, G), trans, model, time.perf_counter() + 0.01, 1.0, 0, spec)
    t0 = time.perf_counter()
    moves = anneal_until(bin_LE, neighbour_weights(bin_LE, trans, G), trans, model, t0 + 0.5, 1.0, 0, spec)
    assert time.perf_counter() - t0 < 0.5 + 1.0  # one chunk past the deadline at most, and chunks shrink
    assert moves > 0 and colocated(bin_LE, trans) > before
    assert (np.stack([np.bincount(row, minlength=G) for row in bin_LE]) == E // G).all()  # swaps keep E/G per GPU


def test_a_repair_past_its_deadline_stops_and_a_layer_still_gets_a_balanced_packing() -> None:
    rng = np.random.default_rng(3)
    E, B = 32, 4
    share_E = rng.lognormal(0.0, 0.3, E)
    lm = LoadModel((share_E / share_E.sum())[None, :], np.zeros((1, E, E)), 0.0)
    w_EB = rng.random((E, B))
    bin_E = np.argsort(-share_E) // (E // B)  # the heaviest experts together: far over the limit
    late = time.perf_counter() - 1.0
    assert np.array_equal(repair_balance(bin_E, w_EB, lm, 0, 1.05, deadline=late), bin_E)
    X_EB = np.eye(B)[repair_balance(bin_E, w_EB, lm, 0, 1.05)]
    assert lm.bin_ratio(0, X_EB).max() <= 1.05 + 1e-9
    packed_E = assign_layer(w_EB, lm, 0, 1.05, deadline=late)  # no repair time: the packing fallback
    assert (np.bincount(packed_E, minlength=B) == E // B).all()
    assert lm.bin_ratio(0, np.eye(B)[packed_E]).max() < lm.bin_ratio(0, np.eye(B)[bin_E]).max()


def _busiest_each_layer(phy2log_LP: np.ndarray, load_LE: np.ndarray, G: int) -> np.ndarray:
    L, P = phy2log_LP.shape
    out = np.empty(L)
    for l in range(L):
        held_EG = np.zeros((load_LE.shape[1], G))
        held_EG[phy2log_LP[l], np.arange(P) // (P // G)] = 1.0
        out[l] = ((load_LE[l] / held_EG.sum(axis=1)) @ held_EG).max()
    return out


def _separate_one_swap_at_a_time(phy2log_LP: np.ndarray, load_LE: np.ndarray, G: int) -> np.ndarray:
    """Reference: every allowed swap of the first doubled copy tried by rebuilding the holder sets."""
    out = phy2log_LP.copy()
    L, P = out.shape
    gpu_P = np.arange(P) // (P // G)
    for l in range(L):
        for _ in range(P):
            H_EG = np.zeros((load_LE.shape[1], G), dtype=np.int64)
            np.add.at(H_EG, (out[l], gpu_P), 1)
            dup_P = np.flatnonzero(H_EG[out[l], gpu_P] > 1)
            if dup_P.size == 0:
                break
            p = int(dup_P[0])
            e, g = int(out[l, p]), int(gpu_P[p])
            best, best_q = np.inf, -1
            for q in np.flatnonzero((H_EG[e, gpu_P] == 0) & (H_EG[out[l], g] == 0) & (gpu_P != g)):
                e_P = out[l].copy()
                e_P[p], e_P[q] = e_P[q], e_P[p]
                worst = float(_busiest_each_layer(e_P[None, :], load_LE[l : l + 1], G)[0])
                if worst < best:
                    best, best_q = worst, int(q)
            if best_q < 0:
                break
            out[l, p], out[l, best_q] = out[l, best_q], out[l, p]
    return out


@pytest.mark.parametrize("seed", range(6))
def test_slot_separation_scores_swaps_as_rebuilding_the_holders_does(seed: int) -> None:
    rng = np.random.default_rng(seed)
    L, E, G = 3, 16, 4
    load_LE = rng.lognormal(0.0, 1.2, (L, E)) * 100  # hot experts: eplb doubles some copies on one GPU
    eplb_LP = eplb_phy2log(load_LE, E + 2 * G, G, 1)
    got_LP, ref_LP = separate_slots(eplb_LP, load_LE, G), _separate_one_swap_at_a_time(eplb_LP, load_LE, G)
    P = got_LP.shape[1]

    def doubled(phy_LP: np.ndarray) -> int:  # copies beyond the first of an expert on one GPU
        return sum(P - len(set(zip(row.tolist(), (np.arange(P) // (P // G)).tolist(), strict=True))) for row in phy_LP)

    assert doubled(eplb_LP) > 0 and doubled(got_LP) == doubled(ref_LP) < doubled(eplb_LP)
    for l in range(L):
        assert np.array_equal(np.sort(got_LP[l]), np.sort(eplb_LP[l]))  # swaps only: the same copies
    np.testing.assert_allclose(_busiest_each_layer(got_LP, load_LE, G), _busiest_each_layer(ref_LP, load_LE, G))


@pytest.mark.slow
def test_deepseek_v3_size_solves_keep_their_time_limit() -> None:
    """58 x 256, top-8, 32 GPUs on 4 nodes, 32 redundant slots: a fixed-balance solve and the robustness search
    end near their limits (the search used to take 2x its budget), with a valid, balanced plan."""
    meta, r = synthetic_trace(58, 256, 8, 8192, seed=0, tokens_per_prompt=16)
    g = graph_from_routes(r.expert_ids_TLK, meta, with_coact=False, seq_ids_T=r.seq_ids_T)
    spec = PlanSpec(32, 4, 32, 0.1, time_limit=15.0, seed=0)
    t0 = time.perf_counter()
    res = solve_fixed(g, spec, t0 + spec.time_limit)
    took = time.perf_counter() - t0
    plan = Plan(32, 4, 256, meta.layers, res.phy2log_LP)
    assert imbalance(plan, g)[1] <= 1.1 + 1e-9
    assert took < spec.time_limit + 5.0, took
    t0 = time.perf_counter()
    solve_for_unseen(g, spec, target=1.0, budget=15.0, closest=True)  # unreachable: tries what fits, then stops
    assert time.perf_counter() - t0 < 15.0 + 8.0
