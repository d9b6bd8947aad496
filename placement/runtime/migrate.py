"""Weight migration in a running expert-parallel runtime: apply plan B to ranks that hold plan A's experts.

The ranks hold the experts of their plan-A slots (``replay.LocalExperts``). A move list (``placement.replan.moves``:
per move the layer, expert, source and destination GPU, bytes and round) says which expert weights are copied
where; ``migrate`` runs it round by round on every rank:

- a round is one count exchange and one ``all_to_all_single`` with uneven splits (``Exchanger.rows``): a source
  sends each of its moves of the round as one row, the expert's w1, w3 and w2 flattened, rows grouped by
  destination in move-list order, so a destination knows from the list alone which row is which expert; the
  counts it receives must equal the list's;
- the destination keeps what it received; after the round a rank drops every expert that plan B does not put
  on it and that it sends in no later round;
- at the end each rank stacks its plan-B slots from what it holds (replicas share one copy). Nothing is read
  from the generator or the checkpoint: a weight a rank did not hold under A reaches it only over the group.

Bytes are counted on both sides (send buffer rows x row bytes per destination, receive buffer per source);
both must equal the move list's bytes per GPU pair. ``migrate_bench`` (trace replay) and ``live_migrate_bench``
(the live demo model) run forward under A, migrate, forward under B, and compare both forwards with the
single-process reference. Code is device-agnostic: gloo on CPU, nccl when every rank has a CUDA device.

Dimension key: L MoE layers, E experts, G ranks, S local slots per rank, X elements of one expert (w1, w3, w2
flattened), N rows this rank sends in a round, M rows it receives.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from placement.plan import Plan
from placement.replan.moves import Move, move_list
from placement.runtime.dispatch import EPError, Exchanger, ReplicaTable
from placement.runtime.replay import (
    EPJob,
    ExpertW,
    LocalExperts,
    ModelSpec,
    RankResult,
    forward_stack,
    gates_or_uniform,
    initial_hidden,
    rank_result,
    slot_maps,
)


def plan_moves(plan_a: Plan, plan_b: Plan, expert_bytes: int) -> tuple[Move, ...]:
    """The move list from plan A to plan B (``placement.replan.moves.move_list``) as the runtime runs it."""
    return tuple(move_list(plan_a, plan_b, expert_bytes).moves)


def listed_bytes_GG(moves: Sequence[Move], num_gpus: int) -> np.ndarray:
    """int64 [G, G]: the move list's bytes src -> dst."""
    out = np.zeros((num_gpus, num_gpus), dtype=np.int64)
    for m in moves:
        out[m.src_gpu, m.dst_gpu] += m.bytes
    return out


def check_moves(plan_a: Plan, plan_b: Plan, moves: Sequence[Move], expert_bytes: int) -> None:
    """Raise EPError (one line) unless ``moves``, run in round order, turn plan A's holdings into plan B's."""
    if (plan_a.num_layers, plan_a.num_experts, plan_a.num_gpus) != (
        plan_b.num_layers,
        plan_b.num_experts,
        plan_b.num_gpus,
    ):
        raise EPError(
            f"plan B ({plan_b.num_layers} layers, {plan_b.num_experts} experts, {plan_b.num_gpus} GPUs) does not "
            f"fit plan A ({plan_a.num_layers}, {plan_a.num_experts}, {plan_a.num_gpus}); re-plan for the same model"
        )
    L, E, G = plan_a.num_layers, plan_a.num_experts, plan_a.num_gpus
    holds_LEG = plan_a.holders_LEG > 0
    landed: list[tuple[int, int, int]] = []  # copies of the round in progress land when it ends
    current: int | None = None
    for i, m in sorted(enumerate(moves), key=lambda im: im[1].round):
        if m.round != current:
            for l, e, g in landed:
                holds_LEG[l, e, g] = True
            landed.clear()
            current = m.round
        where = f"move {i} (layer {m.layer}, expert {m.expert}, GPU {m.src_gpu} -> {m.dst_gpu}, round {m.round})"
        if not (0 <= m.layer < L and 0 <= m.expert < E and 0 <= m.src_gpu < G and 0 <= m.dst_gpu < G):
            raise EPError(f"{where}: out of range for {L} layers, {E} experts, {G} GPUs; use this plan's move list")
        if m.src_gpu == m.dst_gpu:
            raise EPError(f"{where}: source and destination are the same GPU; a move copies to another GPU")
        if m.bytes != expert_bytes:
            raise EPError(f"{where}: lists {m.bytes} bytes, an expert of this runtime has {expert_bytes}")
        if not holds_LEG[m.layer, m.expert, m.src_gpu]:
            raise EPError(f"{where}: the source does not hold the expert before the round; the list is not for plan A")
        landed.append((m.layer, m.expert, m.dst_gpu))
    for l, e, g in landed:
        holds_LEG[l, e, g] = True
    missing_X3 = np.argwhere((plan_b.holders_LEG > 0) & ~holds_LEG)
    if missing_X3.size:
        l, e, g = (int(v) for v in missing_X3[0])
        raise EPError(
            f"the move list leaves expert {e} of layer {l} off GPU {g}, where plan B puts it "
            f"({len(missing_X3)} such); make the move list from plan A to plan B"
        )


# ------------------------------------------------------------------------------------------------ per rank


@dataclass(frozen=True)
class MigrationStats:
    """One rank's migration. sent_bytes_G / recv_bytes_G int64 [G]: weight bytes to / from each rank (send and
    receive buffers); sent_experts_G: experts sent to each; peak_held_L int64 [L]: most distinct experts held at
    once per layer (after a round's receive, before its drops); seconds: wall time, barrier to barrier."""

    rank: int
    sent_bytes_G: np.ndarray
    recv_bytes_G: np.ndarray
    sent_experts_G: np.ndarray
    peak_held_L: np.ndarray
    seconds: float


def expert_row(w: ExpertW) -> torch.Tensor:
    """[X]: w1, w3, w2 of one expert flattened into one row."""
    return torch.cat([t.reshape(-1) for t in w])


def row_expert(row_X: torch.Tensor, shapes: Sequence[torch.Size]) -> ExpertW:
    """The inverse of ``expert_row`` (views into ``row_X``)."""
    parts = torch.split(row_X, [math.prod(s) for s in shapes])
    w1, w3, w2 = (p.view(s) for p, s in zip(parts, shapes, strict=True))
    return w1, w3, w2


def migrate(
    ex: Exchanger, local: LocalExperts, plan_b: Plan, moves: Sequence[Move]
) -> tuple[LocalExperts, MigrationStats]:
    """Run ``moves`` on this rank (collective: every rank calls it with the same list); returns the experts of
    this rank's plan-B slots and what moved. ``local`` must hold this rank's plan-A slots."""
    r, G, dev = ex.rank, ex.world, ex.device
    L = local.slot_expert_LS.shape[0]
    shapes = [t.shape[1:] for t in local.weights_L[0]]
    dtype = local.weights_L[0][0].dtype
    X = sum(math.prod(s) for s in shapes)
    held: dict[tuple[int, int], ExpertW] = {}
    for l in range(L):
        for s, e in enumerate(local.slot_expert_LS[l].tolist()):
            w1, w3, w2 = local.weights_L[l]
            held.setdefault((l, e), (w1[s], w3[s], w2[s]))
    slot_expert_LS, slot_of_LE = slot_maps(plan_b, r)
    keep = {(l, int(e)) for l in range(L) for e in slot_expert_LS[l]}
    last_send: dict[tuple[int, int], int] = {}
    by_round: dict[int, list[Move]] = {}
    for m in moves:
        by_round.setdefault(m.round, []).append(m)
        if m.src_gpu == r:
            key = (m.layer, m.expert)
            last_send[key] = max(last_send.get(key, m.round), m.round)
    sent_G, recv_G, sent_n_G = (np.zeros(G, dtype=np.int64) for _ in range(3))
    peak_L = np.bincount([l for l, _ in held], minlength=L).astype(np.int64)
    ex.barrier()
    t0 = time.perf_counter()
    for rnd in sorted(by_round):
        send = sorted((m for m in by_round[rnd] if m.src_gpu == r), key=lambda m: m.dst_gpu)  # stable: list order
        recv = sorted((m for m in by_round[rnd] if m.dst_gpu == r), key=lambda m: m.src_gpu)
        send_G = np.bincount([m.dst_gpu for m in send], minlength=G).astype(np.int64)
        listed_G = np.bincount([m.src_gpu for m in recv], minlength=G).astype(np.int64)
        got_G = ex.counts(send_G)
        if not np.array_equal(got_G, listed_G):
            raise EPError(
                f"rank {r}, round {rnd}: senders announce {got_G.tolist()} experts, the list {listed_G.tolist()}"
            )
        lost = [m for m in send if (m.layer, m.expert) not in held]
        if lost:
            m = lost[0]
            raise EPError(f"rank {r}, round {rnd}: sends expert {m.expert} of layer {m.layer}, which it does not hold")
        rows = [expert_row(held[(m.layer, m.expert)]) for m in send]
        x_NX = torch.stack(rows) if rows else torch.empty((0, X), dtype=dtype, device=dev)
        y_MX = ex.rows(x_NX, send_G, got_G)
        sent_G += send_G * x_NX.shape[1] * x_NX.element_size()
        sent_n_G += send_G
        recv_G += got_G * y_MX.shape[1] * y_MX.element_size()
        for m, row_X in zip(recv, y_MX, strict=True):
            held[(m.layer, m.expert)] = row_expert(row_X, shapes)
        peak_L = np.maximum(peak_L, np.bincount([l for l, _ in held], minlength=L))
        for key in [k for k in held if k not in keep and last_send.get(k, -1) <= rnd]:
            del held[key]
    ex.barrier()
    seconds = time.perf_counter() - t0
    weights = []
    for l in range(L):
        missing = [int(e) for e in slot_expert_LS[l] if (l, int(e)) not in held]
        if missing:
            raise EPError(f"rank {r} ends without expert {missing[0]} of layer {l}, which plan B puts on it")
        ws = [held[(l, int(e))] for e in slot_expert_LS[l]]
        weights.append(tuple(torch.stack([w[i] for w in ws]).contiguous() for i in range(3)))
    stats = MigrationStats(r, sent_G, recv_G, sent_n_G, peak_L, seconds)
    return LocalExperts(slot_expert_LS, slot_of_LE, tuple(weights)), stats  # type: ignore[arg-type]


@dataclass(frozen=True)
class MigrateTask:
    """Trace replay around a migration: forward ``job_a``, run ``moves``, forward ``job_b`` (same routes)."""

    model: ModelSpec
    job_a: EPJob
    job_b: EPJob
    moves: tuple[Move, ...]


def run_migrate_rank(ex: Exchanger, task: MigrateTask) -> tuple[RankResult, MigrationStats, RankResult]:
    """One rank of ``migrate_bench`` (a plain function; ``launch.launch`` calls it in each process)."""
    local_a = LocalExperts.build(task.job_a.plan, ex.rank, task.model, ex.device, {})
    ids_TLK = task.job_a.ids_TLK
    gates_TLK = gates_or_uniform(ids_TLK, task.job_a.gates_TLK)
    x0_TD = initial_hidden(task.model, ids_TLK.shape[0])
    before = _replay(ex, task.job_a, local_a, gates_TLK, x0_TD)
    local_b, stats = migrate(ex, local_a, task.job_b.plan, task.moves)
    del local_a  # plan A's weights are gone; plan B runs on what the migration left
    return before, stats, _replay(ex, task.job_b, local_b, gates_TLK, x0_TD)


def _replay(ex: Exchanger, job: EPJob, local: LocalExperts, gates_TLK: np.ndarray, x0_TD: torch.Tensor) -> RankResult:
    tok_T, x_TD, stats = forward_stack(ex, job, local, ReplicaTable.from_plan(job.plan), gates_TLK, x0_TD)
    return rank_result(ex.rank, tok_T, x_TD, stats, np.stack([s.seconds_3 for s in stats])[None])


@dataclass(frozen=True)
class LiveMigrateTask:
    """The live model around a migration: ``batches`` under ``job_a``, run ``moves``, ``batches`` under
    ``job_b`` (``live.LiveJob``; ``batches``: ``live.Batch``)."""

    model: str
    batches: tuple[Any, ...]
    job_a: Any
    job_b: Any
    moves: tuple[Move, ...]


def run_live_migrate_rank(ex: Exchanger, task: LiveMigrateTask) -> tuple[Any, MigrationStats, Any]:
    """One rank of ``live_migrate_bench``: the model's experts are dropped once plan A's slots are copied out."""
    from placement.runtime.live import drop_experts, ep_model, local_experts, run_live_job

    module, state, refs = ep_model(ex, task.model)
    local_a = local_experts(task.job_a.plan, ex.rank, refs)
    drop_experts(state, refs)
    before = run_live_job(ex, module, state, task.batches, task.job_a, local_a)
    local_b, stats = migrate(ex, local_a, task.job_b.plan, task.moves)
    del local_a
    after = run_live_job(ex, module, state, task.batches, task.job_b, local_b)
    return before, stats, after


# ------------------------------------------------------------------------------------------------ drivers


@dataclass(frozen=True)
class MigrateReport:
    """A forward under plan A, a migration, a forward under plan B.

    before / after: the two forwards (``launch.JobReport`` for replay, ``launch.LiveReport`` for the live model),
    each compared with the single-process reference; measured_bytes_GG int64 [G, G]: weight bytes src -> dst from
    the senders' buffers, received_bytes_GG the same from the receivers', listed_bytes_GG the move list's;
    peak_held: most distinct experts one rank held in one layer during the migration (slots_per_gpu: S);
    seconds: the slowest rank's migration wall time.
    """

    before: Any
    after: Any
    num_moves: int
    num_rounds: int
    expert_bytes: int
    measured_bytes_GG: np.ndarray
    received_bytes_GG: np.ndarray
    listed_bytes_GG: np.ndarray
    peak_held: int
    slots_per_gpu: int
    seconds: float

    @property
    def bytes_equal(self) -> bool:
        return bool(
            np.array_equal(self.measured_bytes_GG, self.listed_bytes_GG)
            and np.array_equal(self.received_bytes_GG, self.listed_bytes_GG)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "num_moves": self.num_moves,
            "num_rounds": self.num_rounds,
            "expert_bytes": self.expert_bytes,
            "bytes_equal": self.bytes_equal,
            "measured_bytes_total": int(self.measured_bytes_GG.sum()),
            "received_bytes_total": int(self.received_bytes_GG.sum()),
            "listed_bytes_total": int(self.listed_bytes_GG.sum()),
            "measured_bytes_pair": self.measured_bytes_GG.tolist(),
            "listed_bytes_pair": self.listed_bytes_GG.tolist(),
            "peak_held": self.peak_held,
            "slots_per_gpu": self.slots_per_gpu,
            "migrate_seconds": self.seconds,
        }


def _report(
    before: Any, after: Any, stats: Sequence[MigrationStats], moves: Sequence[Move], plan_b: Plan, nbytes: int
) -> MigrateReport:
    G = len(stats)
    return MigrateReport(
        before=before,
        after=after,
        num_moves=len(moves),
        num_rounds=len({m.round for m in moves}),
        expert_bytes=nbytes,
        measured_bytes_GG=np.stack([s.sent_bytes_G for s in stats]),
        received_bytes_GG=np.stack([s.recv_bytes_G for s in stats], axis=1),
        listed_bytes_GG=listed_bytes_GG(moves, G),
        peak_held=int(max(s.peak_held_L.max() for s in stats)),
        slots_per_gpu=plan_b.slots_per_gpu,
        seconds=max(s.seconds for s in stats),
    )


def migrate_bench(
    plan_a: Plan,
    plan_b: Plan,
    ids_TLK: np.ndarray,
    world: int,
    *,
    moves: Sequence[Move] | None = None,
    gates_TLK: np.ndarray | None = None,
    mode: str = "home",
    model: ModelSpec | None = None,
    backend: str = "auto",
) -> MigrateReport:
    """Replay ``ids_TLK`` under plan A on ``world`` ranks, migrate to plan B by ``moves`` (default: the move list
    of ``placement.replan.moves``), replay again; every check runs before any process starts."""
    from placement.runtime.launch import assemble, launch, pick_backend, torch_threads, validate_job
    from placement.runtime.replay import dense_reference

    model = model or ModelSpec()
    model.validate()
    job_a = EPJob("before", plan_a, mode, ids_TLK, gates_TLK)
    job_b = EPJob("after", plan_b, mode, ids_TLK, gates_TLK)
    for job in (job_a, job_b):
        validate_job(job, world)
    nbytes = 3 * model.hidden * model.ffn * 4
    mv = tuple(plan_moves(plan_a, plan_b, nbytes) if moves is None else moves)
    check_moves(plan_a, plan_b, mv, nbytes)
    backend = pick_backend(backend, world)
    results = launch(MigrateTask(model, job_a, job_b, mv), world, backend, rank_fn=run_migrate_rank)
    with torch_threads(1):
        ref_TD = dense_reference(model, ids_TLK, gates_TLK).numpy()
    before = assemble(job_a, [res[0] for res in results], ref_TD, model.hidden)
    after = assemble(job_b, [res[2] for res in results], ref_TD, model.hidden)
    return _report(before, after, [res[1] for res in results], mv, plan_b, nbytes)


def live_migrate_bench(
    model_spec: str,
    plan_a: Plan,
    plan_b: Plan,
    world: int,
    prompts: Sequence[str],
    *,
    moves: Sequence[Move] | None = None,
    mode: str = "home",
    batch_size: int = 8,
    max_len: int = 256,
) -> MigrateReport:
    """``prompts`` through the live ``model_spec`` under plan A on ``world`` gloo ranks, migrate to plan B by
    ``moves`` (default: ``placement.replan.moves``), the prompts again; logits vs the single-process model."""
    from placement.runtime.launch import assemble_live, launch, torch_threads, validate_live
    from placement.runtime.live import LiveJob, make_batches, moe_blocks, reference_run
    from profiler.api import load_model

    if batch_size < 1 or max_len < 1:
        raise EPError(f"batch_size={batch_size}, max_len={max_len}: both must be >= 1")
    loaded = load_model(model_spec)
    job_a, job_b = LiveJob("before", plan_a, mode), LiveJob("after", plan_b, mode)
    for job in (job_a, job_b):
        validate_live(job.plan, world, mode, loaded, job.name)
    w1, w3, w2 = moe_blocks(loaded.module)[0].expert(0)
    nbytes = sum(t.numel() * t.element_size() for t in (w1, w3, w2))
    mv = tuple(plan_moves(plan_a, plan_b, nbytes) if moves is None else moves)
    check_moves(plan_a, plan_b, mv, nbytes)
    limit = max_len if loaded.max_positions is None else min(max_len, loaded.max_positions)
    batches = make_batches([loaded.tokenizer(p)[:limit] for p in prompts], batch_size, loaded.pad_id)
    if not batches:
        raise EPError(f"the {len(prompts)} prompts encode to no tokens; pass non-empty prompts")
    task = LiveMigrateTask(model_spec, tuple(batches), job_a, job_b, mv)
    results = launch(task, world, "gloo", rank_fn=run_live_migrate_rank)
    with torch_threads(1):
        ref_TV, ref_TLK = reference_run(loaded, batches)
    hidden = int(w1.shape[1])
    before = assemble_live(job_a, [res[0] for res in results], ref_TV, ref_TLK, hidden, len(prompts))
    after = assemble_live(job_b, [res[2] for res in results], ref_TV, ref_TLK, hidden, len(prompts))
    return _report(before, after, [res[1] for res in results], mv, plan_b, nbytes)
