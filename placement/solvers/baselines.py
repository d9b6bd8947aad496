"""Baseline placements: contiguous (Megatron / vLLM linear), round-robin (vLLM), and EPLB-style balancing.

``eplb`` is our own vectorised implementation of DeepSeek's algorithm: pack experts onto nodes by load,
replicate the hottest experts into the redundant slots of each node, pack the physical experts onto the node's
GPUs. All layers are processed at once; loops run over items (experts / slots) only, never over layers.

Dimension key: X independent rows (layers, or layer x node), I items, L layers, E experts, P slots, G GPUs.
"""

from __future__ import annotations

import time

import numpy as np

from placement.graph import RoutingGraph
from placement.solvers.base import PlanSpec, SolveResult


def balanced_packing(weight_XI: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack I items into ``num_packs`` packs of I / num_packs items each, heaviest item first into the lightest
    pack with room. Returns (pack_XI, rank_XI): each item's pack and its position in the pack."""
    X, I = weight_XI.shape
    cap = I // num_packs
    order_XI = np.argsort(-weight_XI, axis=1, kind="stable")
    pack_XI = np.empty((X, I), dtype=np.int64)
    rank_XI = np.empty((X, I), dtype=np.int64)
    load_XP = np.zeros((X, num_packs))
    count_XP = np.zeros((X, num_packs), dtype=np.int64)
    x_X = np.arange(X)
    for step in range(I):
        item_X = order_XI[:, step]
        masked_XP = np.where(count_XP < cap, load_XP, np.inf)
        p_X = np.argmin(masked_XP, axis=1)
        pack_XI[x_X, item_X] = p_X
        rank_XI[x_X, item_X] = count_XP[x_X, p_X]
        load_XP[x_X, p_X] += weight_XI[x_X, item_X]
        count_XP[x_X, p_X] += 1
    return pack_XI, rank_XI


def replicate_hottest(weight_XI: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray]:
    """Give ``num_phy - I`` extra replicas, one at a time, to the item with the highest load per replica.
    Returns (phy2item_XQ [X, num_phy], count_XI)."""
    X, I = weight_XI.shape
    phy_XQ = np.empty((X, num_phy), dtype=np.int64)
    phy_XQ[:, :I] = np.arange(I)
    count_XI = np.ones((X, I), dtype=np.int64)
    x_X = np.arange(X)
    for q in range(I, num_phy):
        hot_X = np.argmax(weight_XI / count_XI, axis=1)
        phy_XQ[:, q] = hot_X
        count_XI[x_X, hot_X] += 1
    return phy_XQ, count_XI


def eplb_phy2log(load_LE: np.ndarray, num_slots: int, num_gpus: int, num_nodes: int) -> np.ndarray:
    """Hierarchical EPLB: experts -> nodes (balanced), replicate within nodes, physical experts -> GPUs.
    load_LE float [L, E] -> phy2log int64 [L, P]."""
    L, E = load_LE.shape
    N = num_nodes if E % num_nodes == 0 and num_slots % num_nodes == 0 else 1
    G_n, P_n, E_n = num_gpus // N, num_slots // N, E // N
    w = load_LE.astype(np.float64)
    # Step 1: experts -> nodes, E/N per node, heaviest first into the lightest node.
    node_LE, rank_LE = _eplb_packing(w, N)
    node_expert_LNI = np.empty((L, N, E_n), dtype=np.int64)
    l_idx = np.repeat(np.arange(L), E)
    node_expert_LNI[l_idx, node_LE.reshape(-1), rank_LE.reshape(-1)] = np.tile(np.arange(E), L)
    # Step 2: replicate the hottest experts of each node into its P/N slots.
    w_XI = np.take_along_axis(w, node_expert_LNI.reshape(L, -1), axis=1).reshape(L * N, E_n)
    phy_XQ, cnt_XI = replicate_hottest(w_XI, P_n)
    per_phy_XQ = np.take_along_axis(w_XI / cnt_XI, phy_XQ, axis=1)
    # Step 3: physical experts of each node -> its GPUs, P/G per GPU.
    gpu_XQ, slot_XQ = _eplb_packing(per_phy_XQ, G_n)
    local_slot_XQ = gpu_XQ * (P_n // G_n) + slot_XQ
    item_XQ = np.empty_like(phy_XQ)
    np.put_along_axis(item_XQ, local_slot_XQ, phy_XQ, axis=1)
    logical_XQ = np.take_along_axis(node_expert_LNI.reshape(L * N, E_n), item_XQ, axis=1)
    return logical_XQ.reshape(L, N * P_n)


def _eplb_packing(weight_XI: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """``balanced_packing``, except that with one item per pack item i stays in pack i (deepseek-ai/EPLB does so)."""
    X, I = weight_XI.shape
    if I != num_packs:
        return balanced_packing(weight_XI, num_packs)
    return np.tile(np.arange(I, dtype=np.int64), (X, 1)), np.zeros((X, I), dtype=np.int64)


def contiguous_phy2log(load_LE: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
    """Expert e on GPU e // (E/G); redundant slots (the last P/G - E/G of each GPU) take the hottest experts."""
    L, E = load_LE.shape
    return _fill_redundant(np.tile(np.arange(E), (L, 1)), load_LE, num_slots, num_gpus)


def round_robin_phy2log(load_LE: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
    """Expert e on GPU e mod G (vLLM round-robin); redundant slots as in contiguous."""
    L, E = load_LE.shape
    order_E = np.argsort(np.arange(E) % num_gpus, kind="stable")
    return _fill_redundant(np.tile(order_E, (L, 1)), load_LE, num_slots, num_gpus)


def _fill_redundant(base_LE: np.ndarray, load_LE: np.ndarray, num_slots: int, num_gpus: int) -> np.ndarray:
    """Lay out E base experts E/G per GPU, then put replicas of the hottest experts into the remaining slots."""
    L, E = base_LE.shape
    if num_slots == E:
        return base_LE.astype(np.int64)
    phy_LQ, _ = replicate_hottest(load_LE.astype(np.float64), num_slots)
    extra_LR = phy_LQ[:, E:]
    per_gpu_base, per_gpu_extra = E // num_gpus, (num_slots - E) // num_gpus
    parts_LGS = np.concatenate(
        [base_LE.reshape(L, num_gpus, per_gpu_base), extra_LR.reshape(L, per_gpu_extra, num_gpus).swapaxes(1, 2)],
        axis=2,
    )
    return parts_LGS.reshape(L, num_slots).astype(np.int64)


def _baseline(name: str, graph: RoutingGraph, spec: PlanSpec) -> SolveResult:
    t0 = time.perf_counter()
    E = graph.num_experts
    P = E + spec.num_redundant
    load = graph.load_LE.astype(np.float64)
    if name == "contiguous":
        phy = contiguous_phy2log(load, P, spec.num_gpus)
    elif name == "round_robin":
        phy = round_robin_phy2log(load, P, spec.num_gpus)
    else:
        phy = eplb_phy2log(load, P, spec.num_gpus, spec.num_nodes)
    return SolveResult(phy, name, "heuristic", solve_seconds=time.perf_counter() - t0)


def solve_contiguous(graph: RoutingGraph, spec: PlanSpec) -> SolveResult:
    return _baseline("contiguous", graph, spec)


def solve_round_robin(graph: RoutingGraph, spec: PlanSpec) -> SolveResult:
    return _baseline("round_robin", graph, spec)


def solve_eplb(graph: RoutingGraph, spec: PlanSpec) -> SolveResult:
    return _baseline("eplb", graph, spec)
