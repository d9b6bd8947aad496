"""Plan application to a live model: the shipped demo MoE (or a transformers MoE) run expert-parallel.

Every rank loads the model itself, keeps its dense parts whole (embeddings, attention, dense FFNs, norms,
routers, head) and replaces each MoE block by an ``EPMoEBlock`` that holds only the experts of the rank's plan
slots (replicas included); the original blocks, with every expert, are dropped before the first prompt.

- Tokens: the batch's real tokens get global ids t in (prompt, position) order -- the order of a profiled
  trace -- and token t starts on rank t mod G, the *home* rank of placement/metrics.py.
- At each MoE layer the rank routes the tokens it holds with the layer's own router (live routing, recorded),
  then dispatch -> grouped expert compute -> combine with the rules of placement/runtime/dispatch.py, so the bytes
  moved equal ``metrics.traffic`` on the recorded routing.
- Attention needs every token of a sequence, so after the combine the block outputs are all-gathered (the
  *gather* phase, counted apart: the evaluator's all-to-all model leaves it out) and every rank goes on with
  the whole residual stream; the dense parts then compute bit-identical values on every rank.
- *follow* mode is exact as well: the rank holding token t at the next MoE layer is its combine rank at this
  one, and that rank reads t's input from its own copy of the residual stream. A live transformer gathers
  the stream for attention anyway, so follow's dispatch saving is real only where attention is
  sequence-parallel; for placement studies follow is mainly a trace-replay model.

Dimension key: B prompts in a batch, S padded length, T tokens (real ones), H tokens held by a rank, A tokens
after a gather, L MoE layers, K top-k, E experts, G ranks, S local slots, D hidden, F ffn, V vocabulary,
N rows sent, M rows received, Q combine rows received.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from placement.plan import Plan
from placement.runtime.dispatch import (
    EPError,
    Exchanger,
    ReplicaTable,
)
from placement.runtime.replay import ExpertW, LocalExperts, moe_exchange, slot_maps

LIVE_PHASES = ("dispatch", "compute", "combine", "gather")
HF_BLOCKS = {"MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "OlmoeSparseMoeBlock"}  # no shared experts


# ------------------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class MoEBlockRef:
    """One MoE block of a loaded model: ``parent.<attr>`` is the block; ``style`` how it is called
    (``demo``: x_TD -> (y_TD, aux); ``hf``: x_BSD -> y_BSD)."""

    layer: int
    parent: nn.Module
    attr: str
    style: str

    @property
    def block(self) -> nn.Module:
        module: nn.Module = getattr(self.parent, self.attr)
        return module

    def router(self) -> nn.Module:
        r: nn.Module = getattr(self.block, "router" if self.style == "demo" else "gate")
        return r

    def expert(self, e: int) -> ExpertW:
        """(w1_FD, w3_FD, w2_DF) of expert ``e``: gate, up and down projections."""
        ex: Any = self.block.experts
        if self.style == "demo":
            return ex.w_gate_EDF[e].T, ex.w_up_EDF[e].T, ex.w_down_EFD[e].T
        F = ex.gate_up_proj.shape[1] // 2
        return ex.gate_up_proj[e, :F], ex.gate_up_proj[e, F:], ex.down_proj[e]


def moe_blocks(module: nn.Module) -> list[MoEBlockRef]:
    """The MoE blocks of a ``DemoMoE`` or a supported transformers model, in layer order."""
    from profiler.model import DemoMoE, MoEFeedForward

    if isinstance(module, DemoMoE):
        return [
            MoEBlockRef(i, b, "ffn", "demo") for i, b in enumerate(module.blocks) if isinstance(b.ffn, MoEFeedForward)
        ]
    refs = []
    for name, sub in module.named_modules():
        if name.split(".")[-2:-1] != ["layers"] or not hasattr(sub, "mlp"):
            continue
        kind = type(sub.mlp).__name__
        if kind.endswith("SparseMoeBlock") and kind not in HF_BLOCKS:
            raise EPError(f"{kind} is not supported by the EP runtime (shared experts); use {sorted(HF_BLOCKS)}")
        if kind in HF_BLOCKS:
            act = getattr(sub.mlp.experts, "act_fn", None)
            if type(act).__name__ != "SiLUActivation":
                raise EPError(f"{kind}: expert activation {type(act).__name__}; the EP runtime computes SwiGLU")
            refs.append(MoEBlockRef(int(name.split(".")[-1]), sub, "mlp", "hf"))
    if not refs:
        raise EPError(f"{type(module).__name__}: no MoE blocks the EP runtime knows ({sorted(HF_BLOCKS)})")
    return refs


def local_experts(plan: Plan, rank: int, refs: Sequence[MoEBlockRef]) -> LocalExperts:
    """The experts of ``rank``'s plan slots, copied out of the model's blocks (replicas are copies)."""
    slot_expert_LS, slot_of_LE = slot_maps(plan, rank)
    weights = []
    with torch.no_grad():
        for l, ref in enumerate(refs):
            ws = [ref.expert(int(e)) for e in slot_expert_LS[l]]
            weights.append(tuple(torch.stack([w[i] for w in ws]).contiguous() for i in range(3)))
    return LocalExperts(slot_expert_LS, slot_of_LE, tuple(weights))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Batch:
    """Prompts padded to one length: input_BS int64 [B, S], real_BS bool [B, S]; tokens first..first+T-1."""

    input_BS: np.ndarray
    real_BS: np.ndarray
    first: int

    @property
    def num_tokens(self) -> int:
        return int(self.real_BS.sum())


def make_batches(encoded: Sequence[Sequence[int]], batch_size: int, pad_id: int) -> list[Batch]:
    """Right-padded batches of the non-empty token lists, global token ids in order."""
    seqs = [list(s) for s in encoded if len(s)]
    out, first = [], 0
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        n_B = np.array([len(s) for s in chunk])
        input_BS = np.full((len(chunk), int(n_B.max())), pad_id, dtype=np.int64)
        for b, s in enumerate(chunk):
            input_BS[b, : len(s)] = s
        real_BS = np.arange(input_BS.shape[1])[None, :] < n_B[:, None]
        out.append(Batch(input_BS, real_BS, first))
        first += int(n_B.sum())
    return out


def model_logits(module: nn.Module, batch: Batch) -> torch.Tensor:
    """float32 [T, V]: logits of the batch's real tokens, in token order."""
    from profiler.model import DemoMoE

    ids = torch.from_numpy(batch.input_BS)
    with torch.inference_mode():
        if isinstance(module, DemoMoE):
            logits_BSV = module(ids).logits_BSV
        else:
            mask = torch.from_numpy(batch.real_BS.astype(np.int64))
            logits_BSV = module(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return logits_BSV.reshape(-1, logits_BSV.shape[-1])[torch.from_numpy(batch.real_BS.reshape(-1))].float()


def reference_run(loaded: Any, batches: Sequence[Batch]) -> tuple[np.ndarray, np.ndarray]:
    """The single-process model (a ``profiler.api.LoadedModel``) on ``batches``: (logits_TV float32, routing
    ids_TLK int64 captured by the profiler's router hooks), tokens in global order."""
    from profiler.capture import RoutingRecorder

    logits, ids = [], []
    with RoutingRecorder(loaded.module, loaded.adapter) as rec:
        for b in batches:
            logits.append(model_logits(loaded.module, b).numpy())
            ids.append(rec.pop(torch.from_numpy(b.real_BS.reshape(-1)))[0])
    return np.concatenate(logits), np.concatenate(ids).astype(np.int64)


# ------------------------------------------------------------------------------------------------ per rank


def gather_rows(ex: Exchanger, tok_H: np.ndarray, y_HD: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, int]:
    """All-gather (token ids, rows) from every rank with ``all_to_all_single`` (each rank sends its rows to
    all); returns (tok_A, y_AD, bytes this rank sent to other ranks)."""
    G = ex.world
    send_G = np.full(G, tok_H.size, dtype=np.int64)
    recv_G = ex.counts(send_G)
    tok_A = ex.rows(torch.from_numpy(np.tile(tok_H, G)).to(ex.device), send_G, recv_G).cpu().numpy()
    y_AD = ex.rows(y_HD.repeat(G, 1), send_G, recv_G)
    return tok_A, y_AD, tok_H.size * (G - 1) * (y_HD.shape[1] * y_HD.element_size() + 8)


class RankState:
    """What the EP blocks of one rank share: the group, the current job and batch, and the counters."""

    def __init__(self, ex: Exchanger, num_layers: int) -> None:
        self.ex = ex
        self.L = num_layers
        self.local: LocalExperts | None = None
        self.table: ReplicaTable | None = None
        self.mode = "home"
        self.reset()

    def reset(self) -> None:
        G = self.ex.world
        self.sent_L2G = np.zeros((self.L, 2, G), np.int64)
        self.recv_L2G = np.zeros((self.L, 2, G), np.int64)
        self.bytes_L2G = np.zeros((self.L, 2, G), np.int64)
        self.meta_bytes = 0
        self.gather_bytes = 0
        self.seconds_L4 = np.zeros((self.L, len(LIVE_PHASES)))
        self.routes: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []  # (layer, tok_H, ids_HK, gates_HK)

    def begin_batch(self, batch: Batch) -> None:
        self.batch = batch
        self.pos_T = torch.from_numpy(np.flatnonzero(batch.real_BS.reshape(-1)))
        self.tok_H = np.arange(batch.first + self.ex.rank, batch.first + batch.num_tokens, self.ex.world)

    def moe(self, layer: int, router: nn.Module, style: str, x_RD: torch.Tensor) -> torch.Tensor:
        """float [R, D]: the MoE block's output for every padded position R (zero on padding)."""
        if self.local is None or self.table is None:
            raise EPError(f"rank {self.ex.rank}: MoE layer {layer} ran before a job was set (RankState.local)")
        first = self.batch.first
        x_HD = x_RD[self.pos_T[torch.from_numpy(self.tok_H - first)]]
        out = router(x_HD)
        ids, gates = out if style == "demo" else (out[2], out[1])
        ids_HK = ids.cpu().numpy().astype(np.int64)
        gates_HK = gates.float().cpu().numpy()
        self.routes.append((layer, self.tok_H, ids_HK, gates_HK))
        held_H, _, y_HD, st = moe_exchange(
            self.ex, self.local, self.table, layer, self.mode, self.tok_H, x_HD, ids_HK, gates_HK
        )
        t0 = time.perf_counter()
        tok_A, y_AD, nbytes = gather_rows(self.ex, held_H, y_HD)
        y_RD = torch.zeros_like(x_RD)
        y_RD[self.pos_T[torch.from_numpy(tok_A - first)]] = y_AD.to(x_RD.dtype)
        self.tok_H = held_H
        self.sent_L2G[layer] += st.sent_rows_2G
        self.recv_L2G[layer] += st.recv_rows_2G
        self.bytes_L2G[layer] += st.sent_bytes_2G
        self.meta_bytes += st.meta_bytes
        self.gather_bytes += nbytes
        self.seconds_L4[layer] += [*st.seconds_3, time.perf_counter() - t0]
        return y_RD


class EPMoEBlock(nn.Module):
    """Stands in for one MoE block: keeps its router, computes its experts expert-parallel."""

    def __init__(self, state: RankState, layer: int, router: nn.Module, style: str) -> None:
        super().__init__()
        self.state = state
        self.layer = layer
        self.router = router
        self.style = style

    def forward(self, x: torch.Tensor) -> Any:
        y = self.state.moe(self.layer, self.router, self.style, x.reshape(-1, x.shape[-1])).view_as(x)
        return (y, x.new_zeros(())) if self.style == "demo" else y


@dataclass(frozen=True)
class LiveJob:
    """One run of the prompts under a plan and communication model."""

    name: str
    plan: Plan
    mode: str


@dataclass(frozen=True)
class LiveTask:
    """What every rank runs: load ``model`` (a ``profiler.api.load_model`` spec), then every job's batches."""

    model: str
    batches: tuple[Batch, ...]
    jobs: tuple[LiveJob, ...]
    repeats: int = 1


@dataclass(frozen=True)
class LiveRankResult:
    """One rank's view of one job (counters from the last repeat).

    tok_T int64: the home tokens (t mod G) whose logits_TV float32 this rank returns; route_* the routing it
    decided, one row per (layer, held token): layer_N, tok_N int64, ids_NK int64, gates_NK float32;
    sent_rows_L2G / recv_rows_L2G / sent_bytes_L2G as ``replay.RankResult``; gather_bytes: bytes of the
    all-gathers sent to other ranks; seconds_RL4 float64 [repeats, L, 4]: dispatch, compute, combine, gather.
    """

    rank: int
    tok_T: np.ndarray
    logits_TV: np.ndarray
    layer_N: np.ndarray
    tok_N: np.ndarray
    ids_NK: np.ndarray
    gates_NK: np.ndarray
    sent_rows_L2G: np.ndarray
    recv_rows_L2G: np.ndarray
    sent_bytes_L2G: np.ndarray
    meta_bytes: int
    gather_bytes: int
    seconds_RL4: np.ndarray


def run_live_rank(ex: Exchanger, task: LiveTask) -> list[LiveRankResult]:
    """Every job of ``task`` on this rank (a plain function; ``launch.launch`` calls it in each process)."""
    module, state, refs = ep_model(ex, task.model)
    locals_: dict[int, LocalExperts] = {}
    for job in task.jobs:
        if id(job.plan) not in locals_:
            locals_[id(job.plan)] = local_experts(job.plan, ex.rank, refs)
    drop_experts(state, refs)
    seconds_JRL4 = np.zeros((len(task.jobs), task.repeats, len(refs), len(LIVE_PHASES)))
    out: list[LiveRankResult] = []
    for rep in range(task.repeats):
        out = []
        for j, job in enumerate(task.jobs):
            res = run_live_job(ex, module, state, task.batches, job, locals_[id(job.plan)])
            seconds_JRL4[j, rep] = res.seconds_RL4[0]
            out.append(res)
    return [replace(res, seconds_RL4=seconds_JRL4[j]) for j, res in enumerate(out)]


def ep_model(ex: Exchanger, model: str) -> tuple[nn.Module, RankState, list[MoEBlockRef]]:
    """Load ``model`` (a ``profiler.api.load_model`` spec) on this rank: (module, the rank's state, its MoE
    blocks, still holding every expert until ``drop_experts``)."""
    from profiler.api import load_model

    module = load_model(model).module.eval()
    refs = moe_blocks(module)
    return module, RankState(ex, len(refs)), refs


def drop_experts(state: RankState, refs: Sequence[MoEBlockRef]) -> None:
    """Replace every MoE block by an ``EPMoEBlock``: from here on the rank holds its slots' copies only."""
    for l, ref in enumerate(refs):
        setattr(ref.parent, ref.attr, EPMoEBlock(state, l, ref.router(), ref.style))


def run_live_job(
    ex: Exchanger, module: nn.Module, state: RankState, batches: Sequence[Batch], job: LiveJob, local: LocalExperts
) -> LiveRankResult:
    """All ``batches`` once under ``job`` with the experts ``local`` (seconds_RL4 of this one run)."""
    state.local, state.table = local, ReplicaTable.from_plan(job.plan)
    state.mode = job.mode
    state.reset()
    tok, logits = [], []
    ex.barrier()
    for batch in batches:
        state.begin_batch(batch)
        mine_T = np.arange(batch.num_tokens) % ex.world == (ex.rank - batch.first) % ex.world
        logits.append(model_logits(module, batch)[torch.from_numpy(mine_T)].cpu().numpy())
        tok.append(batch.first + np.flatnonzero(mine_T))
    K = state.routes[0][2].shape[1] if state.routes else 1
    return LiveRankResult(
        rank=ex.rank,
        tok_T=np.concatenate(tok),
        logits_TV=np.concatenate(logits),
        layer_N=np.concatenate([np.full(t.size, l) for l, t, _, _ in state.routes]).astype(np.int64),
        tok_N=np.concatenate([t for _, t, _, _ in state.routes]).astype(np.int64),
        ids_NK=np.concatenate([i for _, _, i, _ in state.routes]).reshape(-1, K),
        gates_NK=np.concatenate([g for _, _, _, g in state.routes]).reshape(-1, K),
        sent_rows_L2G=state.sent_L2G.copy(),
        recv_rows_L2G=state.recv_L2G.copy(),
        sent_bytes_L2G=state.bytes_L2G.copy(),
        meta_bytes=state.meta_bytes,
        gather_bytes=state.gather_bytes,
        seconds_RL4=state.seconds_L4[None].copy(),
    )


def check_plan_for_model(plan: Plan, name: str, num_experts: int, layers: tuple[int, ...], where: str) -> None:
    """Raise EPError (one line) unless ``plan`` was made for a model with these experts and MoE layer ids."""
    if plan.num_experts != num_experts or plan.layers != tuple(layers):
        raise EPError(
            f"{where}: plan is for {plan.num_experts} experts and MoE layers {list(plan.layers)}, model {name} has "
            f"{num_experts} experts and MoE layers {list(layers)}; make the plan from a trace of this model"
        )
