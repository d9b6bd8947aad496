"""Migration between two plans: moves (../shared/METRICS.md), GPU relabelling, and a move list in rounds.

``count_moves(a, b)`` is METRICS.md's moves(A -> B): the (layer, GPU, expert) placements of B that A lacks.

``relabel_gpus`` renames B's GPUs to minimise moves from A: an assignment problem on overlap[g_new, g_cur] =
number of experts both GPUs hold (summed over layers, or per layer), solved exactly (scipy's linear assignment);
with several nodes, GPUs map to GPUs of one node and nodes to nodes (inner assignments for every node pair,
then an outer one over nodes). One renaming for all layers keeps every metric of B (colocation depends on GPU
identity across layers); ``per_layer=True`` renames each layer on its own (fewer moves, imbalance kept,
colocation not), which is what a balance-only planner such as EPLB can use. Kept experts keep their slots.

``move_list`` schedules the copies in rounds for GPUs that each have ONE spare expert slot. In a round each GPU
receives at most one expert (any layer) into its spare slot, then frees one slot of that layer (``evict``: an
expert it holds beyond what the new plan needs, whose outgoing copies are all done by the end of the round), so
the spare is free again. Copies read from sources that hold the expert until the round ends. Pairing each
incoming copy with the slot it frees makes a dependency graph (a copy waits for the outgoing copies of the
expert it evicts); its strongly connected components (rotations of experts between GPUs of one layer) run in
one round, so a component must not make a GPU receive twice: such a component is split by exchanging the
evicted slots of two of its copies into that GPU. Components then take the earliest round after their
dependencies in which all of their GPUs are free.

Dimension key: L MoE layers, E experts, G GPUs, N nodes, P slots, M moves, C components.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from placement.plan import Plan, PlanError
from placement.replan.rounds import schedule_rounds

MOVES_SCHEMA_VERSION = 1

__all__ = [
    "MOVES_SCHEMA_VERSION",
    "Move",
    "MoveList",
    "apply_moves",
    "count_moves",
    "expert_bytes_from_hf_config",
    "holders_LEG",
    "move_list",
    "relabel_gpus",
    "save_moves",
]


def holders_LEG(plan: Plan) -> np.ndarray:
    """bool [L, E, G]: GPU g holds a replica of expert e at layer l (H_l(e) of METRICS.md)."""
    return np.asarray(plan.holders_LEG > 0)


def _check_same_model(a: Plan, b: Plan) -> None:
    if (a.num_experts, a.layers, a.num_gpus) != (b.num_experts, b.layers, b.num_gpus):
        raise PlanError(
            f"plans differ in model or GPUs: {a.num_experts} experts x {a.num_layers} layers on {a.num_gpus} GPUs "
            f"vs {b.num_experts} x {b.num_layers} on {b.num_gpus}; moves compare plans of one model and G"
        )


def count_moves(a: Plan, b: Plan) -> int:
    """moves(A -> B) of METRICS.md: sum over l, g of |{e: g holds e in B} minus {e: g holds e in A}|."""
    _check_same_model(a, b)
    return int((holders_LEG(b) & ~holders_LEG(a)).sum())


# ------------------------------------------------------------------------------------------------ relabelling


def _node_assignment(overlap_XGG: np.ndarray, num_nodes: int) -> np.ndarray:
    """int64 [X, G]: label (current GPU) of each new GPU maximising the overlap, GPUs kept within nodes."""
    X, G, _ = overlap_XGG.shape
    Gn = G // num_nodes
    out = np.empty((X, G), dtype=np.int64)
    for x in range(X):
        if num_nodes == 1:
            _, out[x] = linear_sum_assignment(-overlap_XGG[x])
            continue
        blocks = overlap_XGG[x].reshape(num_nodes, Gn, num_nodes, Gn).transpose(0, 2, 1, 3)
        inner = [[linear_sum_assignment(-blocks[n, m]) for m in range(num_nodes)] for n in range(num_nodes)]
        value_NN = np.array([[blocks[n, m][inner[n][m]].sum() for m in range(num_nodes)] for n in range(num_nodes)])
        _, node_of = linear_sum_assignment(-value_NN)
        for n, m in enumerate(node_of):
            rows, cols = inner[n][m]
            out[x, n * Gn + rows] = m * Gn + cols
    return out


def align_slots(current: Plan, phy2log_LP: np.ndarray) -> np.ndarray:
    """phy2log with each GPU's slots reordered so that an expert the GPU keeps stays in its current slot."""
    S, G = current.slots_per_gpu, current.num_gpus
    out = np.array(phy2log_LP, dtype=np.int64).reshape(-1, G, S)
    cur = current.phy2log.reshape(-1, G, S)
    for l, g in np.ndindex(out.shape[0], G):
        new, old = out[l, g].tolist(), cur[l, g].tolist()
        row = [-1] * S
        rest = []
        for e in new:
            k = next((k for k in range(S) if row[k] < 0 and old[k] == e), None)
            if k is None:
                rest.append(e)
            else:
                row[k] = e
        free = iter(k for k in range(S) if row[k] < 0)
        for e in rest:
            row[next(free)] = e
        out[l, g] = row
    return out.reshape(phy2log_LP.shape)


def relabel_gpus(current: Plan, new: Plan, *, per_layer: bool = False) -> Plan:
    """``new`` with its GPUs renamed to minimise moves from ``current`` (exact assignment; module docstring).
    One renaming for all layers (every metric kept) unless ``per_layer``."""
    _check_same_model(current, new)
    if current.num_slots != new.num_slots or current.num_nodes != new.num_nodes:
        raise PlanError(
            f"plans differ in slots or nodes ({current.num_slots} vs {new.num_slots} slots, {current.num_nodes} vs "
            f"{new.num_nodes} nodes); re-plan with the current plan's --redundant and --nodes"
        )
    G, S = new.num_gpus, new.slots_per_gpu
    hn, hc = holders_LEG(new).astype(np.float64), holders_LEG(current).astype(np.float64)
    overlap_LGG = np.einsum("leg,leh->lgh", hn, hc)
    overlap_XGG = overlap_LGG if per_layer else overlap_LGG.sum(axis=0, keepdims=True)
    label_XG = _node_assignment(overlap_XGG, new.num_nodes)
    label_LG = np.broadcast_to(label_XG, (new.num_layers, G))
    # slot k of new GPU g goes to slot k of GPU label[g]
    src_slot_LP = np.empty((new.num_layers, new.num_slots), dtype=np.int64)
    dst_LGS = label_LG[:, :, None] * S + np.arange(S)
    np.put_along_axis(src_slot_LP, dst_LGS.reshape(new.num_layers, -1), np.arange(new.num_slots)[None, :], axis=1)
    phy2log_LP = align_slots(current, np.take_along_axis(new.phy2log, src_slot_LP, axis=1))
    relabelled = replace(new, phy2log=phy2log_LP)
    prov = {**new.provenance, "relabelled": {"per_layer": per_layer, "moves": count_moves(current, relabelled)}}
    return replace(relabelled, provenance=prov)


# ------------------------------------------------------------------------------------------------ move lists


@dataclass(frozen=True)
class Move:
    """Copy expert ``expert`` of MoE layer index ``layer`` (into plan.layers) from ``src_gpu`` to ``dst_gpu`` in
    round ``round``; afterwards ``dst_gpu`` frees one slot of that layer holding expert ``evict``."""

    layer: int
    expert: int
    src_gpu: int
    dst_gpu: int
    bytes: int
    round: int
    evict: int = -1


_MOVE_FIELDS = ("layer", "expert", "src_gpu", "dst_gpu", "bytes", "round", "evict")


@dataclass(frozen=True)
class MoveList:
    """The copies that turn one plan into the next, in rounds (module docstring); JSON with schema version."""

    model_name: str
    num_gpus: int
    expert_bytes: int
    moves: tuple[Move, ...] = ()
    layers: tuple[int, ...] = ()
    schema_version: int = MOVES_SCHEMA_VERSION
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def total_bytes(self) -> int:
        return sum(m.bytes for m in self.moves)

    @property
    def num_rounds(self) -> int:
        return 1 + max((m.round for m in self.moves), default=-1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model_name": self.model_name,
            "num_gpus": self.num_gpus,
            "expert_bytes": self.expert_bytes,
            "layers": list(self.layers),
            "num_moves": len(self.moves),
            "num_rounds": self.num_rounds,
            "total_bytes": self.total_bytes,
            "moves": [{k: getattr(m, k) for k in _MOVE_FIELDS} for m in self.moves],
            "info": self.info,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "move list") -> MoveList:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{where}: not JSON ({exc}); pass a move list written by `moeplace replan`") from exc
        if not isinstance(d, dict) or "moves" not in d:
            raise PlanError(f"{where}: a move list is a JSON object with a 'moves' field")
        if d.get("schema_version", MOVES_SCHEMA_VERSION) != MOVES_SCHEMA_VERSION:
            raise PlanError(
                f"{where}: move list schema {d['schema_version']}; this moeplace reads {MOVES_SCHEMA_VERSION}"
            )
        try:
            moves = tuple(Move(**{k: int(m[k]) for k in _MOVE_FIELDS if k in m}) for m in d["moves"])
            return cls(
                model_name=str(d.get("model_name", "")),
                num_gpus=int(d["num_gpus"]),
                expert_bytes=int(d.get("expert_bytes", 0)),
                moves=moves,
                layers=tuple(int(x) for x in d.get("layers", ())),
                info=dict(d.get("info", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{where}: malformed move ({exc}); pass a move list written by `moeplace replan`") from exc


def _layer_copies(hc_EG: np.ndarray, hf_EG: np.ndarray, node_G: np.ndarray) -> list[tuple[int, int, int]]:
    """One layer: (expert, src, dst) of each copy; the source holds the expert in the current plan."""
    sends_G = np.zeros(hc_EG.shape[1], dtype=np.int64)
    copies: list[tuple[int, int, int]] = []
    for e, dst in zip(*np.nonzero((hf_EG > 0) & (hc_EG == 0)), strict=True):
        cand = np.flatnonzero(hc_EG[e] > 0)
        # a source that keeps the expert adds no dependency; then same node, then the least busy
        key = [(hf_EG[e, s] == 0, node_G[s] != node_G[dst], sends_G[s], s) for s in cand]
        src = int(cand[min(range(len(cand)), key=key.__getitem__)])
        sends_G[src] += 1
        copies.append((int(e), src, int(dst)))
    return copies


def move_list(current: Plan, new: Plan, expert_bytes: int) -> MoveList:
    """One move per (layer, dst GPU, expert) newly held (``count_moves`` of them), in rounds (module docstring)."""
    _check_same_model(current, new)
    if current.num_slots != new.num_slots:
        raise PlanError(f"plans have {current.num_slots} and {new.num_slots} slots per layer; re-plan with equal slots")
    hc_LEG, hf_LEG = current.holders_LEG, new.holders_LEG
    copies = [
        (l, e, src, dst)
        for l in range(current.num_layers)
        for e, src, dst in _layer_copies(hc_LEG[l], hf_LEG[l], current.node_of_gpu_G)
    ]
    round_M, evict_M = schedule_rounds(hc_LEG, hf_LEG, copies)
    order = sorted(range(len(copies)), key=lambda m: (round_M[m], copies[m]))
    moves = tuple(Move(*copies[m], int(expert_bytes), round_M[m], evict_M[m]) for m in order)
    return MoveList(new.model_name or current.model_name, current.num_gpus, int(expert_bytes), moves, current.layers)


def apply_moves(current: Plan, moves: MoveList) -> np.ndarray:
    """Simulate a move list on ``current`` with one spare slot per GPU; int64 [L, E, G] replicas per GPU after.

    Raises PlanError at the first broken rule: a GPU receiving twice in a round, a source that no longer holds
    its expert, an eviction of an expert the GPU does not hold, or of the last copy a later round still reads.
    """
    cnt_LEG = np.array(current.holders_LEG, dtype=np.int64)
    by_round: dict[int, list[Move]] = {}
    for mv in moves.moves:
        by_round.setdefault(mv.round, []).append(mv)
    pending: dict[tuple[int, int, int], int] = {}  # (layer, gpu, expert) -> copies still to read there
    for mv in moves.moves:
        key = (mv.layer, mv.src_gpu, mv.expert)
        pending[key] = pending.get(key, 0) + 1
    for r in sorted(by_round):
        batch = by_round[r]
        dsts = [mv.dst_gpu for mv in batch]
        if len(set(dsts)) != len(dsts):
            raise PlanError(f"round {r}: a GPU receives more than one expert; it has one spare slot")
        for mv in batch:
            if cnt_LEG[mv.layer, mv.expert, mv.src_gpu] == 0:
                raise PlanError(f"round {r}: GPU {mv.src_gpu} no longer holds expert {mv.expert} of layer {mv.layer}")
        for mv in batch:
            cnt_LEG[mv.layer, mv.expert, mv.dst_gpu] += 1
            pending[(mv.layer, mv.src_gpu, mv.expert)] -= 1
        for mv in batch:
            if cnt_LEG[mv.layer, mv.evict, mv.dst_gpu] == 0 or (mv.evict == mv.expert):
                raise PlanError(f"round {r}: GPU {mv.dst_gpu} cannot free expert {mv.evict} of layer {mv.layer}")
            cnt_LEG[mv.layer, mv.evict, mv.dst_gpu] -= 1
            if cnt_LEG[mv.layer, mv.evict, mv.dst_gpu] == 0 and pending.get((mv.layer, mv.dst_gpu, mv.evict), 0):
                raise PlanError(
                    f"round {r}: GPU {mv.dst_gpu} frees expert {mv.evict} of layer {mv.layer} before copying it out"
                )
    return cnt_LEG


def expert_bytes_from_hf_config(path: str | Path) -> int:
    """Bytes of one routed expert's weights from a Hugging Face config.json (or its directory): 3 matrices of
    hidden_size x moe_intermediate_size (DeepSeek, Qwen-MoE; intermediate_size for Mixtral) in torch_dtype
    (placement/timemodel.py ``dims_from_hf_config`` reads the config)."""
    from placement.timemodel import TimeModelError, dims_from_hf_config

    try:
        return dims_from_hf_config(path, fix="pass --expert-bytes").expert_bytes
    except TimeModelError as exc:
        raise PlanError(str(exc)) from None


def save_moves(moves: MoveList, path: str | Path) -> None:
    """Write a move list atomically (temp file + rename)."""
    from placement.trace.dataset import atomic_write_bytes

    atomic_write_bytes(Path(path), moves.to_json().encode())
