"""Local launcher of the EP runtime and the ``ep_bench`` driver.

``launch`` starts R processes with torch.multiprocessing, one process group over a free local port (gloo on
CPU; nccl when every rank can have its own CUDA device), runs ``replay.run_rank`` in each and returns the
ranks' results through a queue. Start method: ``fork`` for single-threaded gloo ranks on Linux (no second
torch import: 4 ranks start in well under a second instead of ~15 s on a 2-core machine), else ``spawn``
(CUDA needs it, and a forked child must not run OpenMP with more than one thread: it hangs).

``ep_bench`` validates the request before any process starts, launches, and compares the ranks' results with
the single-process dense reference (max relative error per token) and with ``metrics.traffic`` (tokens per
layer, phase and rank pair; bytes = tokens x hidden x 4).

``live_bench`` does the same for a live model (placement/runtime/live.py: every rank runs ``run_live_rank``, passed
to ``launch`` as ``rank_fn``): plan vs model checked first, logits compared with the single-process model, and
predictions computed from the routing the ranks recorded. Gloo on CPU only (the model stays on the CPU).

Dimension key: L MoE layers, G ranks, T tokens, D hidden.
"""

from __future__ import annotations

import os
import queue as queue_mod
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from placement.metrics import MODES, traffic
from placement.runtime.dispatch import DistExchanger, EPError
from placement.runtime.replay import PHASES, EPJob, EPTask, ModelSpec, RankResult, dense_reference, run_rank
from placement.trace.schema import RouteArrays

BACKENDS = ("auto", "gloo", "nccl")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pick_backend(requested: str, world: int) -> str:
    """``auto``: nccl when there are at least ``world`` CUDA devices, else gloo."""
    if requested not in BACKENDS:
        raise EPError(f"backend {requested!r}: use one of {', '.join(BACKENDS)}")
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested == "auto":
        return "nccl" if n_cuda >= world else "gloo"
    if requested == "nccl" and n_cuda < world:
        raise EPError(f"backend nccl needs {world} CUDA devices (one per rank), found {n_cuda}; use gloo")
    return requested


RankFn = Callable[[DistExchanger, Any], Any]  # (exchanger, task) -> that rank's results


def _worker(rank: int, world: int, port: int, backend: str, task: Any, out: Any, threads: int, rank_fn: RankFn) -> None:
    """Body of one spawned rank: join the group, run ``rank_fn``, put (rank, results) on ``out``."""
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    try:
        out.put((rank, rank_fn(DistExchanger(device), task)))
    finally:
        dist.destroy_process_group()


def launch(
    task: Any,
    world: int,
    backend: str = "auto",
    start_method: str | None = None,
    rank_fn: RankFn = run_rank,
) -> list[Any]:
    """Run ``rank_fn(exchanger, task)`` on ``world`` local ranks; returns results[rank] (for the default
    ``replay.run_rank``: results[rank][job]). ``start_method`` None: see above. ``rank_fn`` must be a
    module-level function (spawn pickles it)."""
    import torch.multiprocessing as mp

    backend = pick_backend(backend, world)
    threads = max(1, (os.cpu_count() or 1) // world)
    method = start_method or ("fork" if backend == "gloo" and threads == 1 and sys.platform == "linux" else "spawn")
    if method == "fork" and (backend == "nccl" or threads > 1):
        raise EPError(f"start method fork needs single-threaded gloo ranks (backend {backend}, {threads} threads)")
    out = mp.get_context(method).Queue()
    procs = mp.start_processes(
        _worker,
        args=(world, free_port(), backend, task, out, threads, rank_fn),
        nprocs=world,
        join=False,
        start_method=method,
    )
    results: dict[int, Any] = {}
    try:
        while len(results) < world:
            try:
                rank, res = out.get(timeout=0.2)
                results[rank] = res
            except queue_mod.Empty:
                if procs.join(timeout=0) and out.empty():
                    break
        procs.join()
    except mp.ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1]
        raise EPError(f"rank {exc.error_index} failed: {last}") from exc
    except mp.ProcessExitedException as exc:
        raise EPError(f"rank {exc.error_index} exited with code {exc.exit_code} (killed?)") from exc
    if len(results) < world:
        raise EPError(f"only ranks {sorted(results)} of {world} returned results")
    return [results[r] for r in range(world)]


# ------------------------------------------------------------------------------------------------ ep_bench


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` intra-op threads, then restore the count (small matmuls on a busy 2-core
    machine run ~9x slower with 2 OpenMP threads than with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def validate_job(job: EPJob, world: int) -> None:
    """Raise EPError (one line) unless ``job`` can run on ``world`` ranks; call before any process starts."""
    plan, ids = job.plan, job.ids_TLK
    if job.mode not in MODES:
        raise EPError(f"mode {job.mode!r}: use one of {', '.join(MODES)}")
    if world < 1 or world != plan.num_gpus:
        raise EPError(
            f"--ranks {world} does not match the plan's {plan.num_gpus} GPUs; "
            f"run with --ranks {plan.num_gpus} or make a plan for {world} GPUs"
        )
    if plan.num_slots % world:
        raise EPError(f"--ranks {world} does not divide the plan's {plan.num_slots} slots per layer")
    if ids.ndim != 3 or ids.shape[0] < 1:
        raise EPError(f"{job.name}: routes must have shape [T >= 1, L, K], got {list(ids.shape)}")
    if ids.shape[1] != plan.num_layers:
        raise EPError(
            f"{job.name}: the plan has {plan.num_layers} MoE layers, the routes {ids.shape[1]}; "
            "use a plan made for this model"
        )
    if int(ids.max()) >= plan.num_experts or int(ids.min()) < -1:
        raise EPError(
            f"{job.name}: routes hold expert ids {int(ids.min())}..{int(ids.max())}, the plan has "
            f"{plan.num_experts} experts; use a plan made for this model"
        )
    if job.gates_TLK is not None and job.gates_TLK.shape != ids.shape:
        raise EPError(f"{job.name}: gate weights shape {list(job.gates_TLK.shape)} != routes {list(ids.shape)}")


@dataclass(frozen=True)
class JobReport:
    """Measured vs predicted traffic and output error of one job.

    measured_L2GG int64 [L, 2, G, G]: payload rows (tokens) sent src -> dst per layer and phase, from the
    senders' counters; received_L2GG: the same from the receivers' counters; measured_bytes_L2GG: bytes of
    those rows as sent; predicted_L2GG: ``metrics.traffic`` for the same plan, routes and mode.
    max_rel_error: max over tokens of |x_ep - x_ref|_2 / |x_ref|_2 after the last layer.
    layer_seconds_L: per layer, the slowest rank's wall time (median over repeats); phase_seconds_3: the
    same per phase (dispatch, compute, combine), summed over layers.
    """

    name: str
    mode: str
    num_ranks: int
    num_tokens: int
    token_bytes: int
    measured_L2GG: np.ndarray
    received_L2GG: np.ndarray
    measured_bytes_L2GG: np.ndarray
    predicted_L2GG: np.ndarray
    max_rel_error: float
    layer_seconds_L: np.ndarray
    phase_seconds_3: np.ndarray
    meta_bytes: int

    @property
    def bytes_equal(self) -> bool:
        return bool(
            np.array_equal(self.measured_L2GG, self.predicted_L2GG)
            and np.array_equal(self.received_L2GG, self.measured_L2GG)
            and np.array_equal(self.measured_bytes_L2GG, self.predicted_L2GG * self.token_bytes)
        )

    @property
    def cross_rank_bytes(self) -> int:
        return int(self.measured_bytes_L2GG.sum())

    @property
    def predicted_bytes(self) -> int:
        return int(self.predicted_L2GG.sum()) * self.token_bytes

    def pair_bytes(self, measured: bool = True) -> np.ndarray:
        """int64 [G, G]: bytes src -> dst summed over layers and phases."""
        if measured:
            return np.asarray(self.measured_bytes_L2GG.sum(axis=(0, 1)))
        return np.asarray(self.predicted_L2GG.sum(axis=(0, 1)) * self.token_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.mode,
            "num_ranks": self.num_ranks,
            "num_tokens": self.num_tokens,
            "token_bytes": self.token_bytes,
            "bytes_equal": self.bytes_equal,
            "measured_bytes_total": self.cross_rank_bytes,
            "predicted_bytes_total": self.predicted_bytes,
            "measured_bytes_pair": self.pair_bytes(True).tolist(),
            "predicted_bytes_pair": self.pair_bytes(False).tolist(),
            "measured_tokens_per_layer": self.measured_L2GG.sum(axis=(1, 2, 3)).tolist(),
            "predicted_tokens_per_layer": self.predicted_L2GG.sum(axis=(1, 2, 3)).tolist(),
            "meta_bytes_total": self.meta_bytes,
            "max_rel_error": self.max_rel_error,
            "layer_seconds": self.layer_seconds_L.tolist(),
            "layer_seconds_mean": float(self.layer_seconds_L.mean()),
            "phase_seconds": dict(zip(PHASES, self.phase_seconds_3.tolist(), strict=True)),
        }


def max_rel_error(x_TD: np.ndarray, ref_TD: np.ndarray) -> float:
    """max over tokens of |x - ref|_2 / |ref|_2."""
    num_T = np.linalg.norm(x_TD.astype(np.float64) - ref_TD, axis=1)
    den_T = np.maximum(np.linalg.norm(ref_TD.astype(np.float64), axis=1), 1e-30)
    return float((num_T / den_T).max()) if num_T.size else 0.0


def assemble(job: EPJob, per_rank: Sequence[RankResult], ref_TD: np.ndarray, hidden: int) -> JobReport:
    """One job's report from every rank's result (rank order)."""
    G = len(per_rank)
    T = job.ids_TLK.shape[0]
    tok = np.concatenate([r.tok_T for r in per_rank])
    if not np.array_equal(np.sort(tok), np.arange(T)):
        raise EPError(f"{job.name}: the ranks ended holding {tok.size} tokens, not each of the {T} once")
    x_TD = np.empty((T, hidden), dtype=np.float32)
    x_TD[tok] = np.concatenate([r.x_TD for r in per_rank])
    sent = np.stack([r.sent_rows_L2G for r in per_rank], axis=2)  # [L, 2, src, dst]
    recv = np.stack([r.recv_rows_L2G for r in per_rank], axis=3)  # [L, 2, src, dst]
    sent_bytes = np.stack([r.sent_bytes_L2G for r in per_rank], axis=2)
    routes = RouteArrays(job.ids_TLK, np.zeros(T, np.int64), np.zeros(T, np.int32))
    sec_GRL3 = np.stack([r.seconds_RL3 for r in per_rank])
    sec_L3 = np.median(sec_GRL3.max(axis=0), axis=0)
    layer_sec_L = np.median(sec_GRL3.sum(axis=3).max(axis=0), axis=0)
    return JobReport(
        name=job.name,
        mode=job.mode,
        num_ranks=G,
        num_tokens=T,
        token_bytes=hidden * 4,
        measured_L2GG=sent,
        received_L2GG=recv,
        measured_bytes_L2GG=sent_bytes,
        predicted_L2GG=traffic(job.plan, routes, job.mode),
        max_rel_error=max_rel_error(x_TD, ref_TD),
        layer_seconds_L=layer_sec_L,
        phase_seconds_3=sec_L3.sum(axis=0),
        meta_bytes=sum(r.meta_bytes for r in per_rank),
    )


def ep_bench(
    jobs: Sequence[EPJob],
    world: int,
    model: ModelSpec | None = None,
    backend: str = "auto",
    repeats: int = 1,
) -> list[JobReport]:
    """Validate, run every job on one ``world``-rank group, compare with the reference and the evaluator."""
    model = model or ModelSpec()
    model.validate()
    if repeats < 1:
        raise EPError(f"repeats={repeats}: must be >= 1")
    if not jobs:
        raise EPError("no jobs to run")
    for job in jobs:
        validate_job(job, world)
    pick_backend(backend, world)
    results = launch(EPTask(model, tuple(jobs), repeats), world, backend)
    refs: dict[int, np.ndarray] = {}
    reports = []
    for j, job in enumerate(jobs):
        key = id(job.ids_TLK)
        if key not in refs:
            with torch_threads(1):
                refs[key] = dense_reference(model, job.ids_TLK, job.gates_TLK).numpy()
        reports.append(assemble(job, [results[r][j] for r in range(world)], refs[key], model.hidden))
    return reports


# ------------------------------------------------------------------------------------------------ live model


@dataclass(frozen=True)
class LiveReport:
    """A live-model run (placement/runtime/live.py): ``job`` holds the replay report's fields with max_rel_error
    the max relative error of the logits (per token, L2) against the single-process model and predictions from
    the routing the run recorded. gather_bytes: all-gather bytes for attention (outside the all-to-all model);
    gather_seconds_L: its slowest-rank time per layer; routing_mismatch: (token, layer) pairs whose live expert
    set differs from the single-process model's; ids_TLK int64 [T, L, K]: the recorded routing."""

    job: JobReport
    num_prompts: int
    gather_bytes: int
    gather_seconds_L: np.ndarray
    routing_mismatch: int
    ids_TLK: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return self.job.to_dict() | {
            "num_prompts": self.num_prompts,
            "gather_bytes_total": self.gather_bytes,
            "gather_seconds": self.gather_seconds_L.tolist(),
            "routing_mismatch": self.routing_mismatch,
        }


def validate_live(plan: Any, world: int, mode: str, model: Any, where: str) -> None:
    """Raise EPError (one line) unless ``plan`` fits ``model`` (a LoadedModel) on ``world`` ranks."""
    from placement.runtime.live import check_plan_for_model

    check_plan_for_model(plan, model.name, model.num_experts, model.layers, where)
    ids = np.zeros((1, plan.num_layers, 1), dtype=np.int64)
    validate_job(EPJob(where, plan, mode, ids), world)


def live_bench(
    model_spec: str,
    jobs: Sequence[Any],
    world: int,
    prompts: Sequence[str],
    batch_size: int = 8,
    max_len: int = 256,
    repeats: int = 1,
) -> list[LiveReport]:
    """Run ``prompts`` through ``model_spec`` (``profiler.api.load_model``) on ``world`` gloo ranks under each
    ``live.LiveJob``; compare logits and routing with the single-process model and bytes with the evaluator.
    Every check runs before any process starts."""
    from placement.runtime.live import LiveTask, make_batches, moe_blocks, reference_run, run_live_rank
    from profiler.api import load_model

    if repeats < 1 or batch_size < 1 or max_len < 1:
        raise EPError(f"repeats={repeats}, batch_size={batch_size}, max_len={max_len}: all must be >= 1")
    if not jobs:
        raise EPError("no jobs to run")
    loaded = load_model(model_spec)
    refs = moe_blocks(loaded.module)
    for job in jobs:
        validate_live(job.plan, world, job.mode, loaded, job.name)
    limit = max_len if loaded.max_positions is None else min(max_len, loaded.max_positions)
    batches = make_batches([loaded.tokenizer(p)[:limit] for p in prompts], batch_size, loaded.pad_id)
    if not batches:
        raise EPError(f"the {len(prompts)} prompts encode to no tokens; pass non-empty prompts")
    results = launch(LiveTask(model_spec, tuple(batches), tuple(jobs), repeats), world, "gloo", rank_fn=run_live_rank)
    with torch_threads(1):
        ref_TV, ref_TLK = reference_run(loaded, batches)
    hidden = int(refs[0].expert(0)[0].shape[1])
    return [
        assemble_live(job, [results[r][j] for r in range(world)], ref_TV, ref_TLK, hidden, len(prompts))
        for j, job in enumerate(jobs)
    ]


def assemble_live(
    job: Any, per_rank: Sequence[Any], ref_TV: np.ndarray, ref_TLK: np.ndarray, hidden: int, num_prompts: int
) -> LiveReport:
    """One live job's report from every rank's ``LiveRankResult`` (rank order) and the single-process run."""
    T, L, K = ref_TLK.shape
    tok = np.concatenate([r.tok_T for r in per_rank])
    if not np.array_equal(np.sort(tok), np.arange(T)):
        raise EPError(f"{job.name}: the ranks returned logits for {tok.size} tokens, not each of the {T} once")
    logits_TV = np.empty_like(ref_TV)
    logits_TV[tok] = np.concatenate([r.logits_TV for r in per_rank])
    ids_TLK = np.full((T, L, K), -1, dtype=np.int64)
    seen_TL = np.zeros((T, L), dtype=np.int64)
    for r in per_rank:
        ids_TLK[r.tok_N, r.layer_N] = r.ids_NK
        np.add.at(seen_TL, (r.tok_N, r.layer_N), 1)
    if (seen_TL != 1).any():
        raise EPError(f"{job.name}: the ranks routed some (token, layer) {int(seen_TL.max())} or 0 times, not once")
    routes = RouteArrays(ids_TLK, np.zeros(T, np.int64), np.zeros(T, np.int32))
    sec_GRL4 = np.stack([r.seconds_RL4 for r in per_rank])
    slow_RL4 = sec_GRL4.max(axis=0)
    rep = JobReport(
        name=job.name,
        mode=job.mode,
        num_ranks=len(per_rank),
        num_tokens=T,
        token_bytes=hidden * 4,
        measured_L2GG=np.stack([r.sent_rows_L2G for r in per_rank], axis=2),
        received_L2GG=np.stack([r.recv_rows_L2G for r in per_rank], axis=3),
        measured_bytes_L2GG=np.stack([r.sent_bytes_L2G for r in per_rank], axis=2),
        predicted_L2GG=traffic(job.plan, routes, job.mode),
        max_rel_error=max_rel_error(logits_TV, ref_TV),
        layer_seconds_L=np.median(sec_GRL4[..., :3].sum(axis=3).max(axis=0), axis=0),
        phase_seconds_3=np.median(slow_RL4[..., :3], axis=0).sum(axis=0),
        meta_bytes=sum(r.meta_bytes for r in per_rank),
    )
    mismatch = int((np.sort(ids_TLK, axis=2) != np.sort(ref_TLK, axis=2)).any(axis=2).sum())
    return LiveReport(
        rep, num_prompts, sum(r.gather_bytes for r in per_rank), np.median(slow_RL4[..., 3], axis=0), mismatch, ids_TLK
    )
