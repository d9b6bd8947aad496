"""Importer for routing traces stored as NumPy arrays (.npz, and ExFlow-style .npy).

Arrays read from an .npz (all but ``routes`` optional):

- ``routes``: int [T, L, K] expert ids (or [T, L] for top-1); -1 = not recorded. Another array name can be
  chosen with ``key`` (``file.npz:prefill`` on the command line).
- ``prompt_lens`` [S]: tokens per prompt, rows consecutive per prompt (sum = T); ``prompt_ids`` [S] their ids.
- ``scores`` float [T, L, K]: gate weights; ``num_experts`` scalar; ``layers`` / ``moe_layer_ids`` [L];
  ``model_name`` scalar string.

Dimension key: T tokens, L MoE layers, K top-k, S prompts.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from placement.trace.schema import RouteArrays, TraceError, TraceMeta, one_line, validate_gates, validate_routes


def _as_routes_TLK(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise TraceError(f"{where}: routes must have shape [T, L, K] or [T, L], got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TraceError(f"{where}: routes must hold integer expert ids, got dtype {arr.dtype}")
    if arr.size and int(arr.max()) > np.iinfo(np.int16).max:
        raise TraceError(f"{where}: expert id {int(arr.max())} does not fit int16")
    if arr.size and np.issubdtype(arr.dtype, np.signedinteger) and int(arr.min()) < -1:
        raise TraceError(f"{where}: expert id {int(arr.min())} < -1; use -1 for 'not recorded'")
    return arr.astype(np.int16)


def _ints(a: object, where: str, key: str, *, scalar: bool = False) -> np.ndarray:
    """``a`` as int64 after checking it holds integers (one, if ``scalar``; else at most one dimension)."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "iu" or (arr.size != 1 if scalar else arr.ndim > 1):
        want = "one integer" if scalar else "a 1-D integer array"
        raise TraceError(f"{where}: {key} must be {want}, got {arr.dtype} of shape {list(arr.shape)}")
    if arr.size and arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        raise TraceError(f"{where}: {key} holds {int(arr.max())}, too large")
    return arr.reshape(-1).astype(np.int64)


def routes_from_arrays(
    routes: np.ndarray,
    *,
    where: str,
    model_name: str,
    num_experts: int | None = None,
    layers: np.ndarray | None = None,
    prompt_lens: np.ndarray | None = None,
    prompt_ids: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    source: str = "npz",
) -> tuple[TraceMeta, RouteArrays]:
    """Build (meta, routes) from plain arrays, validating every field (used by the .npz and .npy readers)."""
    ids_TLK = _as_routes_TLK(np.asarray(routes), where)
    T, L, K = ids_TLK.shape
    if num_experts is None:
        num_experts = int(ids_TLK.max()) + 1 if ids_TLK.size else 1
    layer_ids = np.arange(L) if layers is None else _ints(layers, where, "layers")
    if layer_ids.shape != (L,):
        raise TraceError(f"{where}: layers has {layer_ids.size} ids but routes have L={L} layers")
    meta = TraceMeta(model_name, int(num_experts), K, tuple(int(x) for x in layer_ids), source=source)
    validate_routes(ids_TLK, meta, where)
    if prompt_lens is None:
        seq_T = np.zeros(T, dtype=np.int64)
        pos_T = np.arange(T, dtype=np.int32)
    else:
        lens_S = _ints(prompt_lens, where, "prompt_lens")
        if (lens_S < 0).any() or int(lens_S.sum()) != T:
            raise TraceError(f"{where}: prompt_lens sum to {int(lens_S.sum())} but routes have T={T} tokens")
        ids_S = np.arange(lens_S.size) if prompt_ids is None else _ints(prompt_ids, where, "prompt_ids")
        if ids_S.shape != lens_S.shape:
            raise TraceError(f"{where}: prompt_ids has {ids_S.size} entries, prompt_lens {lens_S.size}")
        seq_T = np.repeat(ids_S, lens_S)
        starts_S = np.cumsum(lens_S) - lens_S
        pos_T = (np.arange(T) - np.repeat(starts_S, lens_S)).astype(np.int32)
    gates = None
    if scores is not None:
        if np.asarray(scores).dtype.kind not in "fiu":
            raise TraceError(f"{where}: scores must be numbers (gate weights), got {np.asarray(scores).dtype}")
        gates = np.asarray(scores)
        if gates.ndim == 2:
            gates = gates[:, :, None]
        if gates.shape != ids_TLK.shape:
            raise TraceError(f"{where}: scores shape {gates.shape} != routes shape {ids_TLK.shape}")
        validate_gates(gates, meta, where, seq_T, pos_T)  # before the float32 cast: NaN, inf, < 0, too large
        gates = gates.astype(np.float32)
    return meta, RouteArrays(ids_TLK, seq_T, pos_T, gates)


def read_npz(
    path: str | Path, *, key: str | None = None, num_experts: int | None = None, model_name: str | None = None
) -> tuple[TraceMeta, RouteArrays]:
    """Read an .npz (or a bare .npy routes array) trace into memory."""
    p = Path(path)
    where = f"{p}:{key}" if key else str(p)
    if not p.is_file():
        raise TraceError(f"{p}: no such file")
    if p.suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (OSError, EOFError, ValueError) as exc:
            raise TraceError(f"{p}: not a readable .npy file ({one_line(exc)})") from exc
        return routes_from_arrays(arr, where=where, model_name=model_name or p.stem, num_experts=num_experts)
    try:
        data = np.load(p, allow_pickle=False)
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zipfile.BadZipFile) as exc:
        raise TraceError(f"{p}: not a readable .npz file ({one_line(exc)})") from exc
    try:
        with data:
            return _read_members(data, p, where, key, num_experts, model_name)
    except TraceError:
        raise
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error) as exc:
        # a member that does not decode (RuntimeError: "encrypted"; NotImplementedError: unknown compression)
        raise TraceError(f"{where}: damaged .npz member ({type(exc).__name__}: {one_line(exc)})") from exc


def _read_members(
    data: Any, p: Path, where: str, key: str | None, num_experts: int | None, model_name: str | None
) -> tuple[TraceMeta, RouteArrays]:
    name = key or "routes"
    if name not in data.files:
        have = ", ".join(data.files) or "nothing"
        raise TraceError(
            f"{where}: no array {name!r} (the file has: {have}); store routes [T, L, K] as 'routes' "
            "or pick an array with FILE.npz:NAME"
        )
    if num_experts is None and "num_experts" in data.files:
        num_experts = int(_ints(data["num_experts"], where, "num_experts", scalar=True)[0])
    layers = next((data[k] for k in ("layers", "moe_layer_ids") if k in data.files), None)
    if model_name is None:
        model_name = str(data["model_name"]) if "model_name" in data.files else p.name.split(".")[0]
    scores = data["scores"] if "scores" in data.files and name == "routes" else None
    lens = data["prompt_lens"] if "prompt_lens" in data.files and name == "routes" else None
    pids = data["prompt_ids"] if "prompt_ids" in data.files and name == "routes" else None
    return routes_from_arrays(
        data[name],
        where=where,
        model_name=model_name,
        num_experts=num_experts,
        layers=layers,
        prompt_lens=lens,
        prompt_ids=pids,
        scores=scores,
    )
