"""Importer for Megatron-Core router traces (megatron/core/transformer/moe/router_trace.py).

``--moe-routing-trace-path DIR`` makes every rank write ``DIR/router_trace_rank{r}.jsonl``, one JSON record
per (step, block, layer) router call::

    {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 128, "topk": 8, "top_indices": [[12, 45, ...], ...]}

MTP records (``"block": "mtp"``, with ``mtp_idx``) are skipped: they are not decoder layers. Records of one
rank and step are grouped by layer; a layer called several times in a step (micro-batches) has its calls
concatenated in order, so the n-th token of every layer is the same token. Every group must cover every MoE
layer of the trace with the same number of tokens. Ranks are merged by concatenating their tokens (data- and
expert-parallel ranks see different tokens; with tensor parallelism import one rank's file only).

Each (rank, step) group becomes one sequence (``seq_id``), ``token_pos`` is the token's index in the group.

Dimension key: T tokens, L MoE layers, K top-k.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from placement.trace.schema import RouteArrays, TraceError, TraceMeta, validate_routes

_RANK_RE = re.compile(r"router_trace_rank(\d+)\.jsonl$")
_REQUIRED = ("step", "layer", "topk", "top_indices")


def megatron_paths(src: Path) -> list[Path]:
    """A rank file, or every ``router_trace_rank*.jsonl`` of a directory, in rank order."""
    if src.is_dir():
        paths = [p for p in src.glob("router_trace_rank*.jsonl") if _RANK_RE.search(p.name)]
        if not paths:
            raise TraceError(f"{src}: no router_trace_rank*.jsonl files in this directory")
        return sorted(paths, key=lambda p: int(_RANK_RE.search(p.name).group(1)))  # type: ignore[union-attr]
    if not src.is_file():
        raise TraceError(f"{src}: no such file or directory")
    return [src]


@dataclass(frozen=True)
class _Group:
    """Routes of one (rank, step): layer id -> int32 [T, K]."""

    where: str
    step: int
    by_layer: dict[int, np.ndarray]


def _iter_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        fh = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read ({exc})") from exc
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}:{lineno}: not a JSON record ({exc.msg}); truncated file?") from exc
            if not isinstance(rec, dict) or any(k not in rec for k in _REQUIRED):
                have = ", ".join(sorted(rec)) if isinstance(rec, dict) else type(rec).__name__
                raise TraceError(
                    f"{path}:{lineno}: record lacks {', '.join(_REQUIRED)} (has {have}); not a Megatron-Core "
                    "router trace (router_trace.py) this moeplace knows"
                )
            if rec.get("block", "decoder") != "decoder" or "mtp_idx" in rec:
                continue
            for key in ("step", "layer", "topk", "num_tokens"):
                if key in rec and (type(rec[key]) is not int or rec[key] < (1 if key == "topk" else 0)):
                    raise TraceError(f"{path}:{lineno}: {key}={rec[key]!r}; expected an integer >= 0 (topk >= 1)")
            yield lineno, rec


def _iter_groups(paths: list[Path]) -> Iterator[_Group]:
    for path in paths:
        step: int | None = None
        parts: dict[int, list[np.ndarray]] = {}
        for lineno, rec in _iter_records(path):
            s = int(rec["step"])
            if step is not None and s != step:
                yield _close(path, step, parts)
                parts = {}
            step = s
            where = f"{path}:{lineno}"
            K = int(rec["topk"])
            try:
                ids = np.asarray(rec["top_indices"])
            except (TypeError, ValueError) as exc:  # ragged lists
                raise TraceError(f"{where}: top_indices is not a [num_tokens, topk] integer list ({exc})") from exc
            if (ids.size and ids.dtype.kind not in "iu") or ids.dtype.kind not in "iuf":
                raise TraceError(f"{where}: top_indices holds {ids.dtype} values, not expert ids (integers)")
            if ids.size and (ids.dtype == np.uint64 or int(ids.max()) > np.iinfo(np.int16).max):
                raise TraceError(f"{where}: expert id {int(ids.max())} in top_indices does not fit int16")
            ids = ids.astype(np.int64)
            if ids.size == 0:
                ids = ids.reshape(0, K)
            if ids.ndim != 2 or ids.shape[1] != K:
                raise TraceError(f"{where}: top_indices has shape {list(ids.shape)}, expected [num_tokens, {K}]")
            if "num_tokens" in rec and int(rec["num_tokens"]) != ids.shape[0]:
                raise TraceError(f"{where}: num_tokens={rec['num_tokens']} but top_indices has {ids.shape[0]} rows")
            parts.setdefault(int(rec["layer"]), []).append(ids)
        if step is not None:
            yield _close(path, step, parts)


def _close(path: Path, step: int, parts: dict[int, list[np.ndarray]]) -> _Group:
    ks = {a.shape[1] for arrs in parts.values() for a in arrs}
    if len(ks) > 1:
        raise TraceError(f"{path}: step {step}: mixed top-k {sorted(ks)} within one step; expected one topk")
    by_layer = {layer: np.concatenate(arrs) for layer, arrs in parts.items()}
    counts = {layer: a.shape[0] for layer, a in by_layer.items()}
    if len(set(counts.values())) > 1:
        (l0, n0), (l1, n1) = sorted(counts.items(), key=lambda kv: kv[1])[:: len(counts) - 1]
        raise TraceError(
            f"{path}: step {step}: layer {l0} routed {n0} tokens but layer {l1} routed {n1}; every layer "
            "of a step must see the same tokens (was the trace cut off mid-step?)"
        )
    return _Group(f"{path} step {step}", step, by_layer)


@dataclass(frozen=True)
class MegatronRoutes:
    """Metadata of a Megatron trace plus a re-iterable stream of token batches (one per rank and step)."""

    meta: TraceMeta
    paths: tuple[Path, ...]

    def iter_batches(self) -> Iterator[RouteArrays]:
        seq = 0
        for g in _iter_groups(list(self.paths)):
            if set(g.by_layer) != set(self.meta.layers):
                missing = sorted(set(self.meta.layers) - set(g.by_layer))
                raise TraceError(
                    f"{g.where}: no records for MoE layers {missing}; every rank must trace every MoE layer "
                    "(pipeline-parallel traces: import one stage's layers per dataset)"
                )
            ids_TLK = np.stack([g.by_layer[layer] for layer in self.meta.layers], axis=1)
            if ids_TLK.size and int(ids_TLK.max()) > np.iinfo(np.int16).max:
                raise TraceError(f"{g.where}: expert id {int(ids_TLK.max())} does not fit int16")
            ids_TLK = ids_TLK.astype(np.int16)
            if ids_TLK.shape[2] != self.meta.top_k:
                raise TraceError(f"{g.where}: mixed top-k: topk={ids_TLK.shape[2]} here, {self.meta.top_k} before")
            validate_routes(ids_TLK, self.meta, g.where)
            T = ids_TLK.shape[0]
            yield RouteArrays(ids_TLK, np.full(T, seq, np.int64), np.arange(T, dtype=np.int32))
            seq += 1


def read_megatron(
    paths: list[Path], *, model_name: str | None = None, num_experts: int | None = None
) -> MegatronRoutes:
    """Scan the rank files once for layers, top-k and the largest expert id (bounded memory)."""
    layers: set[int] = set()
    ks: set[int] = set()
    hi = -1
    for g in _iter_groups(paths):
        layers.update(g.by_layer)
        for a in g.by_layer.values():
            ks.add(a.shape[1])
            if a.size:
                hi = max(hi, int(a.max()))
                if int(a.min()) < 0:
                    raise TraceError(f"{g.where}: negative expert id {int(a.min())} in top_indices")
    where = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/ ({len(paths)} rank files)"
    if not layers:
        raise TraceError(f"{where}: no decoder router records; nothing to import")
    if len(ks) > 1:
        raise TraceError(f"{where}: mixed top-k {sorted(ks)} across records; one trace needs one topk")
    E = hi + 1 if num_experts is None else int(num_experts)
    meta = TraceMeta(
        model_name or "megatron-model",
        max(E, 1),
        ks.pop(),
        tuple(sorted(layers)),
        source="megatron-router-trace",
    )
    if hi >= meta.num_experts:
        raise TraceError(
            f"{where}: expert id {hi} >= num_experts={meta.num_experts}; pass the model's real --num-experts"
        )
    return MegatronRoutes(meta, tuple(paths))
