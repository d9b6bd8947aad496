"""Importer for SGLang expert-distribution recorder dumps (``torch.save`` dicts, sglang/srt/eplb).

SGLang writes one of two dump layouts (``--expert-distribution-recorder-mode``):

- ``per_token`` / ``per_pass``: ``{"records": [...], "last_physical_to_logical_map": int [L_all, P]}``, one
  record per forward pass with ``forward_pass_id``, ``rank``, ``gatherer_key`` and either
  ``topk_ids_of_layer`` int32 [L_all, T, 8] (``per_token``: physical expert ids, -1 where not written; columns
  beyond the model's top-k and dense layers stay -1) with ``input_ids`` / ``positions`` [T] and
  ``extend_seq_lens`` [S] (None in decode passes), or only ``global_physical_count`` [L_all, P]
  (``per_pass``).
- ``stat``: ``{"rank", "logical_count": int [steps, L_all, E], "average_utilization_rate_over_window"}``.

Per-token records become a token trace (physical ids mapped to logical ids through the map); ``per_pass``
and ``stat`` dumps hold loads only and become a ``LoadTrace``. L_all counts every model layer; dense layers
(all -1, or all-zero counts) are dropped unless ``moe_layers`` names the MoE layers.

Dimension key: A all model layers (L_all), L MoE layers, T tokens, K top-k, P physical slots, E experts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from placement.trace.importers.popularity import LoadTrace
from placement.trace.schema import RouteArrays, TraceError, TraceMeta, check_counts, validate_routes

_DETAIL_KEYS = {"records", "last_physical_to_logical_map"}
_STAT_KEYS = {"logical_count"}


@dataclass(frozen=True)
class SGLangRoutes:
    """A per-token dump: metadata plus a re-iterable stream of logical-id token batches (one per pass)."""

    meta: TraceMeta
    dumps: tuple[tuple[Path, dict[str, Any]], ...]
    layer_index_L: np.ndarray

    def iter_batches(self) -> Iterator[RouteArrays]:
        seq_base = 0
        for path, dump in self.dumps:
            phy2log_AP = _phy2log(dump, path)
            for i, rec in enumerate(dump["records"]):
                routes = _record_routes(rec, phy2log_AP, self, f"{path}: records[{i}]", seq_base)
                seq_base = int(routes.seq_ids_T.max()) + 1 if routes.num_tokens else seq_base
                yield routes


def _np(obj: Any, path: Path, key: str) -> np.ndarray:
    if hasattr(obj, "numpy"):
        return np.asarray(obj.detach().cpu().numpy())
    try:
        return np.asarray(obj)
    except (TypeError, ValueError) as exc:
        raise TraceError(f"{path}: {key} is not an array ({exc})") from exc


def _phy2log(dump: dict[str, Any], path: Path) -> np.ndarray:
    """int64 [L_all, P] ``last_physical_to_logical_map`` after checking it (non-empty, ids 0..32766)."""
    a = _np(dump["last_physical_to_logical_map"], path, "last_physical_to_logical_map")
    if a.ndim != 2 or a.size == 0 or a.dtype.kind not in "iu" or int(a.min()) < 0 or int(a.max()) > 32766:
        raise TraceError(
            f"{path}: last_physical_to_logical_map must be a non-empty int [L_all, P] of expert ids 0..32766, "
            f"got {a.dtype} {list(a.shape)}"
        )
    return a.astype(np.int64)


def _int_list(obj: Any, path: Path, key: str) -> np.ndarray:
    """int64 [n] of a 1-D integer list or tensor (an empty one may be of any number type)."""
    a = _np(obj, path, key)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu") or a.dtype.kind not in "iuf":
        raise TraceError(f"{path}: {key} must be a 1-D list of integers, got {a.dtype} {list(a.shape)}")
    return a.astype(np.int64)


def load_dump(path: Path) -> dict[str, Any]:
    """torch.load a dump (tensors, lists, numbers only: ``weights_only=True``) and check its layout."""
    import torch

    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    try:
        dump = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TraceError(f"{path}: not a readable torch.save file ({msg[:200]})") from exc
    if not isinstance(dump, dict):
        raise TraceError(f"{path}: expected an SGLang expert-distribution dict, got {type(dump).__name__}")
    keys = set(map(str, dump))
    if not (_DETAIL_KEYS <= keys or _STAT_KEYS <= keys):
        raise TraceError(
            f"{path}: unknown SGLang dump layout (keys: {', '.join(sorted(keys)) or 'none'}); this moeplace "
            "reads per_token/per_pass dumps (records + last_physical_to_logical_map) and stat dumps "
            "(logical_count) of sglang/srt/eplb/expert_distribution.py"
        )
    if "records" in dump and not isinstance(dump["records"], list | tuple):
        raise TraceError(f"{path}: 'records' is {type(dump['records']).__name__}, expected a list of dicts")
    return dump


def _check_record(rec: Any, where: str) -> str:
    """'token' for per_token records, 'pass' for per_pass records."""
    if not isinstance(rec, dict):
        raise TraceError(f"{where}: expected a dict record, got {type(rec).__name__}")
    if "topk_ids_of_layer" in rec:
        for key in ("positions",):
            if key not in rec:
                raise TraceError(f"{where}: per_token record without {key!r}; unknown SGLang dump version")
        return "token"
    if "global_physical_count" in rec:
        return "pass"
    raise TraceError(
        f"{where}: record has neither topk_ids_of_layer nor global_physical_count "
        f"(keys: {', '.join(sorted(map(str, rec)))}); unknown SGLang dump version"
    )


def _moe_layers(used_A: np.ndarray, moe_layers: Sequence[int] | None, where: str) -> np.ndarray:
    """Indices into L_all of the MoE layers: the given ones, else the layers with any recorded expert."""
    A = used_A.size
    if moe_layers is not None:
        idx = np.asarray(sorted(set(int(x) for x in moe_layers)), dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= A:
            raise TraceError(f"{where}: --moe-layers {list(moe_layers)} must be layer ids in 0..{A - 1}")
        return idx
    idx = np.flatnonzero(used_A)
    if idx.size == 0:
        raise TraceError(f"{where}: no layer has any recorded expert (all ids -1 / counts 0); nothing to import")
    return idx


def read_sglang(
    paths: Sequence[Path],
    *,
    model_name: str | None = None,
    num_experts: int | None = None,
    moe_layers: Sequence[int] | None = None,
) -> SGLangRoutes | LoadTrace:
    """Read one or more dumps (e.g. one per rank): a token trace for per_token dumps, else a LoadTrace."""
    if not paths:
        raise TraceError("no SGLang dump files given")
    dumps = [(p, load_dump(p)) for p in paths]
    where = str(paths[0]) if len(paths) == 1 else f"{paths[0].parent}/ ({len(paths)} dumps)"
    name = model_name or "sglang-model"
    kinds = set()
    for p, d in dumps:
        if "logical_count" in d and "records" not in d:
            kinds.add("stat")
        elif not _DETAIL_KEYS <= set(d):
            raise TraceError(f"{p}: a per_token or per_pass dump needs both {' and '.join(sorted(_DETAIL_KEYS))}")
        else:
            kinds.update(_check_record(r, f"{p}: records[{i}]") for i, r in enumerate(d["records"]))
    if len(kinds) > 1:
        raise TraceError(f"{where}: mixes dump kinds {sorted(kinds)}; import per_token, per_pass and stat apart")
    kind = kinds.pop() if kinds else "token"
    if kind == "stat":
        return _stat_loads(dumps, where, name, moe_layers)
    if kind == "pass":
        return _pass_loads(dumps, where, name, moe_layers)
    return _token_routes(dumps, where, name, num_experts, moe_layers)


def _stat_loads(
    dumps: list[tuple[Path, dict[str, Any]]], where: str, name: str, moe_layers: Sequence[int] | None
) -> LoadTrace:
    total_AE: np.ndarray | None = None
    for p, d in dumps:
        count = _np(d["logical_count"], p, "logical_count")
        if count.ndim == 2:
            count = count[None]
        if count.ndim != 3 or not np.issubdtype(count.dtype, np.integer):
            raise TraceError(f"{p}: logical_count must be int [steps, L_all, E], got {count.dtype} {count.shape}")
        count_AE = check_counts(count, f"{p}: logical_count", ("step", "layer", "expert")).sum(axis=0)
        if total_AE is not None and total_AE.shape != count_AE.shape:
            raise TraceError(f"{p}: logical_count shape {count_AE.shape} differs from the first dump's")
        total_AE = count_AE if total_AE is None else total_AE + count_AE
    loads = total_AE if total_AE is not None else np.zeros((0, 1), np.int64)
    idx = _moe_layers(np.asarray(loads.any(axis=1)), moe_layers, where)
    return LoadTrace(name, tuple(idx.tolist()), loads[idx], None, "sglang-stat")


def _pass_loads(
    dumps: list[tuple[Path, dict[str, Any]]], where: str, name: str, moe_layers: Sequence[int] | None
) -> LoadTrace:
    total_AE: np.ndarray | None = None
    for p, d in dumps:
        phy2log_AP = _phy2log(d, p)
        A, P = phy2log_AP.shape
        E = int(phy2log_AP.max()) + 1
        phys_AP = np.zeros((A, P), np.int64)
        for i, rec in enumerate(d["records"]):
            c = _np(rec["global_physical_count"], p, f"records[{i}].global_physical_count")
            if c.shape != (A, P):
                raise TraceError(f"{p}: records[{i}].global_physical_count has shape {c.shape}, map has {(A, P)}")
            phys_AP += check_counts(c, f"{p}: records[{i}].global_physical_count", ("layer", "slot"))
        flat = (np.arange(A)[:, None] * E + phy2log_AP).reshape(-1)
        count_AE = np.bincount(flat, weights=phys_AP.reshape(-1), minlength=A * E).astype(np.int64).reshape(A, E)
        if total_AE is not None and total_AE.shape != count_AE.shape:
            raise TraceError(f"{p}: {A} layers x {E} experts differs from the first dump's {total_AE.shape}")
        total_AE = count_AE if total_AE is None else total_AE + count_AE
    loads = total_AE if total_AE is not None else np.zeros((0, 1), np.int64)
    idx = _moe_layers(np.asarray(loads.any(axis=1)), moe_layers, where)
    return LoadTrace(name, tuple(idx.tolist()), loads[idx], None, "sglang-per_pass")


def _token_routes(
    dumps: list[tuple[Path, dict[str, Any]]],
    where: str,
    name: str,
    num_experts: int | None,
    moe_layers: Sequence[int] | None,
) -> SGLangRoutes:
    """First pass: shapes, MoE layers, top-k and expert count, without converting any record."""
    A = -1
    used_A = np.zeros(0, bool)
    used_K = np.zeros(0, bool)
    max_logical = 0
    for p, d in dumps:
        phy2log_AP = _phy2log(d, p)
        if A < 0:
            A = phy2log_AP.shape[0]
            used_A = np.zeros(A, bool)
        elif phy2log_AP.shape[0] != A:
            raise TraceError(f"{p}: {phy2log_AP.shape[0]} model layers, the first dump has {A}")
        max_logical = max(max_logical, int(phy2log_AP.max()))
        for i, rec in enumerate(d["records"]):
            ids = _np(rec["topk_ids_of_layer"], p, f"records[{i}].topk_ids_of_layer")
            if ids.ndim != 3 or ids.shape[0] != A or not np.issubdtype(ids.dtype, np.integer):
                raise TraceError(
                    f"{p}: records[{i}].topk_ids_of_layer must be int [L_all={A}, T, K], got {ids.dtype} {ids.shape}"
                )
            valid = ids >= 0
            used_A |= valid.any(axis=(1, 2))
            used_K = _or_pad(used_K, np.asarray(valid.any(axis=(0, 1))))
    idx = _moe_layers(used_A, moe_layers, where)
    K = int(np.flatnonzero(used_K)[-1]) + 1 if used_K.any() else 1
    E = max_logical + 1 if num_experts is None else int(num_experts)
    if E <= max_logical:
        raise TraceError(f"{where}: --num-experts {E} but the physical-to-logical map names expert {max_logical}")
    meta = TraceMeta(name, E, K, tuple(idx.tolist()), source="sglang-per_token", extra={"sglang_num_layers": A})
    return SGLangRoutes(meta, tuple(dumps), idx)


def _or_pad(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = max(a.size, b.size)
    return np.pad(a, (0, n - a.size)) | np.pad(b, (0, n - b.size))


def _record_routes(
    rec: dict[str, Any], phy2log_AP: np.ndarray, sr: SGLangRoutes, where: str, seq_base: int
) -> RouteArrays:
    """One forward pass -> logical-id routes of the MoE layers; sequences numbered from ``seq_base``."""
    meta, idx_L = sr.meta, sr.layer_index_L
    K = meta.top_k
    ids_ATK = _np(rec["topk_ids_of_layer"], Path(where), "topk_ids_of_layer").astype(np.int64)
    ids_LTK = ids_ATK[idx_L, :, :K]
    if ids_LTK.shape[2] < K:
        ids_LTK = np.pad(ids_LTK, ((0, 0), (0, 0), (0, K - ids_LTK.shape[2])), constant_values=-1)
    P = phy2log_AP.shape[1]
    hi = int(ids_LTK.max()) if ids_LTK.size else -1
    if hi >= P:
        raise TraceError(f"{where}: physical expert id {hi} >= {P} slots of last_physical_to_logical_map")
    valid = ids_LTK >= 0
    log_LTK = np.where(valid, phy2log_AP[idx_L][np.arange(idx_L.size)[:, None, None], np.maximum(ids_LTK, 0)], -1)
    ids_TLK = np.ascontiguousarray(log_LTK.transpose(1, 0, 2)).astype(np.int16)
    validate_routes(ids_TLK, meta, where)
    T = ids_TLK.shape[0]
    pos_T = _int_list(rec["positions"], Path(where), "positions")
    if pos_T.shape != (T,):
        raise TraceError(f"{where}: positions has {pos_T.size} entries, topk_ids_of_layer has T={T} tokens")
    if pos_T.size and (pos_T.min() < 0 or pos_T.max() > np.iinfo(np.int32).max):
        raise TraceError(f"{where}: positions must lie in 0..{np.iinfo(np.int32).max}")
    lens = rec.get("extend_seq_lens")
    lens_S = None if lens is None else _int_list(lens, Path(where), "extend_seq_lens")
    if lens_S is not None and lens_S.size and lens_S.min() >= 0 and int(lens_S.sum()) == T:
        seq_T = seq_base + np.repeat(np.arange(lens_S.size), lens_S)
    else:  # decode pass: one token per sequence
        seq_T = seq_base + np.arange(T)
    return RouteArrays(ids_TLK, seq_T.astype(np.int64), pos_T.astype(np.int32))


def sglang_paths(src: Path) -> list[Path]:
    """A dump file, or every ``*.pt`` dump in a directory (e.g. one per rank), sorted by name."""
    if src.is_dir():
        paths = sorted(src.glob("*.pt"))
        if not paths:
            raise TraceError(f"{src}: no *.pt SGLang dumps in this directory")
        return paths
    if not src.exists():
        raise TraceError(f"{src}: no such file or directory")
    return [src]
