"""Placement plans: which physical slot on which GPU holds which logical expert, per MoE layer.

Slot p lives on GPU p // (P / G); GPU g lives on node g // (G / N). A logical expert with several slots in a
layer is replicated, and its tokens are shared by its replicas.

Dimension key: L MoE layers, E logical experts, P physical slots (E + redundant), G GPUs, N nodes,
R max replicas of one expert.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from placement.trace.schema import TraceMeta

PLAN_SCHEMA_VERSION = 1


class PlanError(ValueError):
    """Invalid plan or plan request; the message is one line naming the field and how to fix it."""


@dataclass(frozen=True)
class Plan:
    """An expert placement. ``phy2log`` int64 [L, P]: logical expert of each physical slot, per layer."""

    num_gpus: int
    num_nodes: int
    num_experts: int
    layers: tuple[int, ...]
    phy2log: np.ndarray = field(compare=False, repr=False)
    model_name: str = ""
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)
    schema_version: int = PLAN_SCHEMA_VERSION

    def __post_init__(self) -> None:
        phy2log_LP = np.array(self.phy2log, dtype=np.int64)
        phy2log_LP.setflags(write=False)
        object.__setattr__(self, "phy2log", phy2log_LP)
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        G, N, E = self.num_gpus, self.num_nodes, self.num_experts
        if G < 1 or N < 1 or E < 1:
            raise PlanError(f"num_gpus={G}, num_nodes={N}, num_experts={E}: all must be >= 1")
        if G % N:
            raise PlanError(f"num_gpus={G} is not divisible by num_nodes={N}; use a node count that divides it")
        if phy2log_LP.ndim != 2 or phy2log_LP.shape[0] != len(self.layers):
            raise PlanError(f"phy2log must have shape [L={len(self.layers)}, P], got {list(phy2log_LP.shape)}")
        P = phy2log_LP.shape[1]
        if P < E:
            raise PlanError(f"phy2log has P={P} slots per layer, fewer than num_experts={E}; every expert needs a slot")
        if P % G:
            raise PlanError(
                f"phy2log has P={P} slots per layer, not divisible by num_gpus={G}; every GPU holds P/G slots"
            )
        bad_LP = (phy2log_LP < 0) | (phy2log_LP >= E)
        if bad_LP.any():
            l, p = np.argwhere(bad_LP)[0]
            raise PlanError(
                f"phy2log[{l}, {p}] = {phy2log_LP[l, p]}: expert ids must be in 0..{E - 1} (num_experts={E})"
            )
        cnt_LE = self.logcnt
        if (cnt_LE == 0).any():
            l, e = np.argwhere(cnt_LE == 0)[0]
            raise PlanError(f"phy2log layer {int(l)} has no slot for expert {int(e)}; every expert needs >= 1 slot")

    # ------------------------------------------------------------------ derived maps
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_slots(self) -> int:
        return int(self.phy2log.shape[1])

    @property
    def slots_per_gpu(self) -> int:
        return self.num_slots // self.num_gpus

    @property
    def gpus_per_node(self) -> int:
        return self.num_gpus // self.num_nodes

    @property
    def gpu_of_slot_P(self) -> np.ndarray:
        return np.arange(self.num_slots) // self.slots_per_gpu

    @property
    def node_of_gpu_G(self) -> np.ndarray:
        return np.arange(self.num_gpus) // self.gpus_per_node

    @cached_property
    def logcnt(self) -> np.ndarray:
        """int64 [L, E]: number of replicas of each logical expert."""
        L, E = self.phy2log.shape[0], self.num_experts
        cnt = np.zeros((L, E), dtype=np.int64)
        np.add.at(cnt, (np.repeat(np.arange(L), self.num_slots), self.phy2log.reshape(-1)), 1)
        return cnt

    @cached_property
    def log2phy(self) -> np.ndarray:
        """int64 [L, E, R]: physical slots of each logical expert in increasing order, padded with -1."""
        L, P = self.phy2log.shape
        R = int(self.logcnt.max()) if self.logcnt.size else 1
        order_LP = np.argsort(self.phy2log, axis=1, kind="stable")
        sorted_LP = np.take_along_axis(self.phy2log, order_LP, axis=1)
        start_LE = np.cumsum(self.logcnt, axis=1) - self.logcnt
        rank_LP = np.arange(P)[None, :] - np.take_along_axis(start_LE, sorted_LP, axis=1)
        out = np.full((L, self.num_experts, R), -1, dtype=np.int64)
        out[np.repeat(np.arange(L), P), sorted_LP.reshape(-1), rank_LP.reshape(-1)] = order_LP.reshape(-1)
        return out

    @cached_property
    def holders_LEG(self) -> np.ndarray:
        """int64 [L, E, G]: number of replicas of expert e on GPU g at layer l (H_l(e) = {g: > 0})."""
        L, P = self.phy2log.shape
        out = np.zeros((L, self.num_experts, self.num_gpus), dtype=np.int64)
        np.add.at(out, (np.repeat(np.arange(L), P), self.phy2log.reshape(-1), np.tile(self.gpu_of_slot_P, L)), 1)
        return out

    def check_trace(self, meta: TraceMeta, where: str = "plan") -> None:
        """Raise PlanError unless this plan is for the model of ``meta`` (expert count and MoE layer ids)."""
        if meta.num_experts != self.num_experts or tuple(meta.layers) != self.layers:
            raise PlanError(
                f"{where}: plan is for a model with {self.num_experts} experts and {self.num_layers} MoE layers "
                f"{_layers_str(self.layers)}, the trace has {meta.num_experts} experts and {meta.num_layers} "
                f"layers {_layers_str(meta.layers)}; plan with a trace of the same model"
            )

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model_name": self.model_name,
            "num_gpus": self.num_gpus,
            "num_nodes": self.num_nodes,
            "num_experts": self.num_experts,
            "num_slots": self.num_slots,
            "layers": list(self.layers),
            "phy2log": self.phy2log.tolist(),
            "provenance": self.provenance,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), default=json_default)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "plan") -> Plan:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"{where}: not JSON ({exc}); pass a plan written by `moeplace plan`") from exc
        if not isinstance(d, dict):
            raise PlanError(f"{where}: a plan is a JSON object, got {type(d).__name__}")
        version = d.get("schema_version", PLAN_SCHEMA_VERSION)
        if version != PLAN_SCHEMA_VERSION:
            raise PlanError(f"{where}: plan schema version {version}; this moeplace reads {PLAN_SCHEMA_VERSION}")
        for key in ("num_gpus", "num_nodes", "num_experts", "layers", "phy2log"):
            if key not in d:
                raise PlanError(f"{where}: missing field {key!r}; pass a plan written by `moeplace plan`")
        for key in ("num_gpus", "num_nodes", "num_experts"):
            _check_json_int(d[key], key, where)
        if not isinstance(d["layers"], list):
            raise PlanError(f"{where}: field 'layers' must be a list of integers")
        for x in d["layers"]:
            _check_json_int(x, "layers", where)
        try:
            raw = np.asarray(d["phy2log"])
            if raw.size and raw.dtype.kind not in "iu":
                raise PlanError(f"field 'phy2log' must hold integer expert ids, got {raw.dtype.name} values")
            phy2log = raw.astype(np.int64)
            return cls(
                num_gpus=d["num_gpus"],
                num_nodes=d["num_nodes"],
                num_experts=d["num_experts"],
                layers=tuple(d["layers"]),
                phy2log=phy2log,
                model_name=str(d.get("model_name", "")),
                provenance=dict(d.get("provenance", {})),
            )
        except PlanError as exc:
            raise PlanError(f"{where}: {exc}") from exc
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: a number beyond int64 (fuzzed)
            raise PlanError(f"{where}: malformed field ({exc}); pass a plan written by `moeplace plan`") from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (temp file + rename)."""
        from placement.trace.dataset import atomic_write_bytes

        atomic_write_bytes(Path(path), self.to_json().encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise PlanError(f"{p}: no such plan file")
        return cls.from_json(p.read_bytes(), where=str(p))


def _check_json_int(x: object, key: str, where: str) -> None:
    """A plan file's integer field holds a JSON integer (not a float like 1.5, a bool or a string)."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise PlanError(f"{where}: field {key!r} must be an integer, got {x!r}; pass a plan written by `moeplace plan`")


def _layers_str(layers: tuple[int, ...]) -> str:
    return f"[{layers[0]}..{layers[-1]}]" if len(layers) > 3 else str(list(layers))


def json_default(o: object) -> object:
    """``json.dumps(default=...)`` for numpy scalars and arrays."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def gpu_of_expert_to_phy2log(gpu_of_LE: np.ndarray, num_gpus: int) -> np.ndarray:
    """int64 [L, E] GPU of each expert (no replicas, E/G per GPU) -> phy2log [L, P=E] (slots ordered by GPU)."""
    E = gpu_of_LE.shape[1]
    counts = np.apply_along_axis(np.bincount, 1, gpu_of_LE, minlength=num_gpus)
    if (counts != E // num_gpus).any():
        raise PlanError(f"every GPU must hold exactly E/G = {E // num_gpus} experts per layer")
    return np.argsort(gpu_of_LE, axis=1, kind="stable").astype(np.int64)
