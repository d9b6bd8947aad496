"""Trace importers: every external routing-trace format into a moeplace Parquet dataset.

``import_trace(src, fmt, out)`` is the one entry point. Formats:

- ``npz`` / ``npy``: arrays ``routes`` [T, L, K] (importers/npz.py); ``file.npz:NAME`` picks an array.
- ``sglang``: SGLang expert-distribution recorder dumps (placement/trace/importers/sglang.py).
- ``megatron``: Megatron-Core ``router_trace_rank{r}.jsonl`` files (placement/trace/importers/megatron.py).
- ``popularity``: per-layer expert counts (loads only; placement/trace/importers/popularity.py).

Token traces are written into a staging directory next to ``out`` and moved into ``out`` only when the whole
import succeeded, so a failed import leaves ``out`` as it was. Loads-only sources (SGLang ``stat`` and
``per_pass`` dumps, popularity JSON) have no per-token routing; ``loads_only=True`` writes them as loads
JSON.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from placement.trace.importers.popularity import LoadTrace, count_loads, read_loads
from placement.trace.schema import RouteArrays, TraceError, TraceMeta, validate_gates

FORMATS = ("npz", "npy", "sglang", "megatron", "popularity")


def import_trace(
    src: str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str],
    *,
    num_experts: int | None = None,
    model_name: str | None = None,
    moe_layers: Sequence[int] | None = None,
    loads_only: bool = False,
    writer_id: str = "import",
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Import ``src`` of format ``fmt`` into the dataset ``out``; returns the token-layer rows written.

    With ``loads_only`` (or for a loads-only source, which requires it) ``out`` is a loads JSON file and the
    return value is the number of MoE layers written.
    """
    if fmt not in FORMATS:
        raise TraceError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    source = _read_source(Path(src), fmt, src, num_experts, model_name, moe_layers)
    out_p = Path(out)
    if isinstance(source, LoadTrace):
        if not loads_only:
            raise TraceError(
                f"{src}: holds per-expert loads only ({source.source}), no per-token routing, so it cannot "
                "become a token trace; pass --loads-only to write the loads as JSON (read by moeplace stats) "
                "or record SGLang with --expert-distribution-recorder-mode per_token"
            )
        if out_p.exists() and not out_p.is_file():
            raise TraceError(f"{out_p}: exists and is not a file; --loads-only writes one JSON file")
        source.save(out_p)
        return len(source.layers)
    meta, batches = source
    if loads_only:
        load_LE = np.zeros((meta.num_layers, meta.num_experts), np.int64)
        num_tokens = 0
        for b in batches:
            load_LE += count_loads(b.expert_ids_TLK, meta.num_experts)
            num_tokens += b.num_tokens
            if on_progress is not None:
                on_progress(b.num_tokens)
        LoadTrace(meta.model_name, meta.layers, load_LE, num_tokens, meta.source).save(out_p)
        return meta.num_layers
    return write_staged(out_p, meta, _checked(batches, meta, str(src)), writer_id=writer_id, on_progress=on_progress)


def _checked(batches: Iterable[RouteArrays], meta: TraceMeta, where: str) -> Iterator[RouteArrays]:
    """The batches, after refusing gate weights that are NaN, infinite or negative (naming the source)."""
    for b in batches:
        if b.gate_weights_TLK is not None:
            validate_gates(b.gate_weights_TLK, meta, where, b.seq_ids_T, b.token_pos_T)
        yield b


def _read_source(
    path: Path,
    fmt: str,
    spec: str | os.PathLike[str],
    num_experts: int | None,
    model_name: str | None,
    moe_layers: Sequence[int] | None,
) -> tuple[TraceMeta, Iterable[RouteArrays]] | LoadTrace:
    if fmt in ("npz", "npy"):
        from placement.trace.importers.npz import read_npz

        s = str(spec)
        npz, _, key = s.partition(".npz:") if ".npz:" in s else (s, "", "")
        p = Path(npz + ".npz") if key else Path(npz)
        meta, routes = read_npz(p, key=key or None, num_experts=num_experts, model_name=model_name)
        step = 65536
        T = routes.num_tokens
        return meta, (routes.take(np.arange(a, min(a + step, T))) for a in range(0, T, step))
    if fmt == "sglang":
        from placement.trace.importers.sglang import read_sglang, sglang_paths

        res = read_sglang(sglang_paths(path), model_name=model_name, num_experts=num_experts, moe_layers=moe_layers)
        return res if isinstance(res, LoadTrace) else (res.meta, res.iter_batches())
    if fmt == "megatron":
        from placement.trace.importers.megatron import megatron_paths, read_megatron

        mr = read_megatron(megatron_paths(path), model_name=model_name, num_experts=num_experts)
        return mr.meta, mr.iter_batches()
    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    return read_loads(path, model_name=model_name)


def write_staged(
    out: Path,
    meta: TraceMeta,
    batches: Iterable[RouteArrays],
    *,
    writer_id: str = "import",
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``batches`` as shards of ``out``, all or nothing.

    Shards go to a sibling staging directory first; on success they are hard-linked into ``out`` under the
    next free ``part-{writer_id}-{n}`` names (a link never replaces an existing file) and the staging
    directory is removed. On any error ``out`` is left unchanged (created only if it did not exist, and
    removed again).
    """
    from placement.trace.dataset import TraceWriter, _check_dataset_meta, check_same_model

    if out.exists() and not out.is_dir():
        raise TraceError(f"{out}: exists and is not a dataset directory; choose another --out")
    existed = out.exists()
    if existed:
        check_same_model(out, meta)  # before the import, not after it
    out.parent.mkdir(parents=True, exist_ok=True)
    linked: list[Path] = []
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        with TraceWriter(stage, meta, writer_id) as w:
            for b in batches:
                w.write(b.expert_ids_TLK, b.seq_ids_T, b.token_pos_T, b.gate_weights_TLK)
                if on_progress is not None:
                    on_progress(b.num_tokens)
        out.mkdir(parents=True, exist_ok=True)
        _check_dataset_meta(out, meta)
        n = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in out.glob(f"part-{writer_id}-*.parquet")), default=-1)
        for shard in w.shards_written:
            while True:
                target = out / f"part-{writer_id}-{n:06d}.parquet"
                n += 1
                try:
                    os.link(shard, target)
                    linked.append(target)
                    break
                except FileExistsError:
                    continue
        return w.rows_written
    except BaseException:
        for target in linked:
            target.unlink(missing_ok=True)
        if not existed and out.exists() and not any(out.glob("part-*.parquet")):
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
