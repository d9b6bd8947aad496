"""Expert-parallel dispatch: which rank computes which (token, expert), and the all-to-all exchanges.

Routing decisions are pure NumPy functions that follow placement/metrics.py to the letter, so the rows the
runtime moves are exactly the tokens ``metrics.traffic`` predicts:

- replica choice (``choose_ranks``): token t on rank s needing expert e uses candidate number t mod count of
  ``metrics.replica_candidates`` (same rank, else same node, else any holder; sorted by rank);
- destinations: one dispatch row per (token, destination rank), however many of its experts that rank serves;
- combine rank (``combine_ranks``): *home* keeps the token where it is (rank t mod G from the start), *follow*
  moves it to the chosen replica of its primary (first recorded) expert.

Moving rows is the job of an ``Exchanger``; ``DistExchanger`` is a thin shell over
``torch.distributed.all_to_all_single`` (uneven splits, counts exchanged first with an equal-size call).

Dimension key: T tokens on this rank, K top-k, L MoE layers, E experts, G ranks (= the plan's GPUs),
C replica candidates, N rows of one exchange (one per token and destination rank), D hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from placement.metrics import MODES, replica_candidates
from placement.plan import Plan

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

META_FIXED = 2  # dispatch meta columns before the K expert ids: token id, combine rank


class EPError(ValueError):
    """Bad expert-parallel run request; the message is one line saying what to change."""


@dataclass(frozen=True)
class ReplicaTable:
    """The replica rule of a plan, computed once per plan on every rank.

    cand_LEGC int64 [L, E, G, C]: ranks a token on rank g may use for expert e (-1 padded);
    ncand_LEG int64 [L, E, G]: how many of them.
    """

    cand_LEGC: np.ndarray
    ncand_LEG: np.ndarray

    @classmethod
    def from_plan(cls, plan: Plan) -> ReplicaTable:
        cand_LEGC, ncand_LEG = replica_candidates(plan)
        return cls(cand_LEGC, ncand_LEG)


def choose_ranks(
    table: ReplicaTable, layer: int, tok_T: np.ndarray, at_T: np.ndarray, ids_TK: np.ndarray
) -> np.ndarray:
    """int64 [T, K]: the rank computing each (token, expert) at ``layer``; -1 where the id is not recorded.

    ``tok_T`` are global token ids (the index of the token in the replayed trace), ``at_T`` the tokens' ranks.
    """
    e_TK = ids_TK.astype(np.int64)
    valid_TK = e_TK >= 0
    e0_TK = np.where(valid_TK, e_TK, 0)
    at_T1 = at_T.astype(np.int64)[:, None]
    n_TK = table.ncand_LEG[layer, e0_TK, at_T1]
    pick_TK = tok_T.astype(np.int64)[:, None] % n_TK
    rank_TK = table.cand_LEGC[layer, e0_TK, at_T1, pick_TK]
    return np.where(valid_TK, rank_TK, -1)


def combine_ranks(rank_TK: np.ndarray, at_T: np.ndarray, mode: str) -> np.ndarray:
    """int64 [T]: where each token's result is combined (and where it lives for the next layer)."""
    if mode not in MODES:
        raise EPError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    at_T = at_T.astype(np.int64)
    if mode == "home":
        return at_T
    valid_TK = rank_TK >= 0
    first_T = np.argmax(valid_TK, axis=1)
    primary_T = rank_TK[np.arange(rank_TK.shape[0]), first_T]
    return np.where(valid_TK.any(axis=1), primary_T, at_T)


@dataclass(frozen=True)
class DispatchMeta:
    """One rank's dispatch at one layer: one row per (token, destination rank), rows grouped by destination.

    row_T_N int64 [N]: which of this rank's tokens the row carries; send_counts_G int64 [G]: rows per
    destination (the diagonal entry stays local); meta_NM int64 [N, 2 + K]: token id, combine rank, then the
    expert ids the destination computes (-1: another rank's); gate_NK float32 [N, K]: their gate weights.
    """

    row_T_N: np.ndarray
    send_counts_G: np.ndarray
    meta_NM: np.ndarray
    gate_NK: np.ndarray


def build_dispatch(
    tok_T: np.ndarray,
    ids_TK: np.ndarray,
    gates_TK: np.ndarray,
    rank_TK: np.ndarray,
    combine_T: np.ndarray,
    num_ranks: int,
) -> DispatchMeta:
    """Rows for every (token, rank) pair where the rank computes at least one of the token's experts."""
    T, K = ids_TK.shape
    G = num_ranks
    dest_GT = np.zeros((G, T), dtype=bool)
    tt, kk = np.nonzero(rank_TK >= 0)
    dest_GT[rank_TK[tt, kk], tt] = True
    g_N, t_N = np.nonzero(dest_GT)  # row-major: grouped by destination, then token order
    mine_NK = rank_TK[t_N] == g_N[:, None]
    meta_NM = np.empty((t_N.size, META_FIXED + K), dtype=np.int64)
    meta_NM[:, 0] = tok_T[t_N]
    meta_NM[:, 1] = combine_T[t_N]
    meta_NM[:, META_FIXED:] = np.where(mine_NK, ids_TK[t_N], -1)
    gate_NK = np.where(mine_NK, gates_TK[t_N], 0.0).astype(np.float32)
    return DispatchMeta(t_N.astype(np.int64), np.bincount(g_N, minlength=G).astype(np.int64), meta_NM, gate_NK)


def sent_off_rank(send_counts_G: np.ndarray, rank: int) -> np.ndarray:
    """int64 [G]: rows sent to other ranks (the rank's own split never leaves it)."""
    out = send_counts_G.astype(np.int64).copy()
    out[rank] = 0
    return out


class Exchanger(Protocol):
    """Moves rows between the ranks of an EP group (one collective call per method, on every rank)."""

    rank: int
    world: int
    device: torch.device

    def counts(self, send_counts_G: np.ndarray) -> np.ndarray:
        """int64 [G] rows each rank will send to this one."""
        ...

    def rows(self, x_N: torch.Tensor, send_counts_G: np.ndarray, recv_counts_G: np.ndarray) -> torch.Tensor:
        """Rows of ``x_N`` (grouped by destination) out; rows from every source (grouped by source) in."""
        ...

    def barrier(self) -> None: ...


class DistExchanger:
    """``Exchanger`` over a torch.distributed process group (gloo on CPU, nccl on GPU)."""

    def __init__(self, device: torch.device, group: ProcessGroup | None = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = device

    def counts(self, send_counts_G: np.ndarray) -> np.ndarray:
        send = torch.as_tensor(send_counts_G, dtype=torch.int64).to(self.device)
        recv = torch.empty_like(send)
        self._dist.all_to_all_single(recv, send, group=self.group)
        return recv.cpu().numpy()

    def rows(self, x_N: torch.Tensor, send_counts_G: np.ndarray, recv_counts_G: np.ndarray) -> torch.Tensor:
        out = x_N.new_empty((int(recv_counts_G.sum()), *x_N.shape[1:]))
        self._dist.all_to_all_single(
            out,
            x_N.contiguous(),
            output_split_sizes=[int(c) for c in recv_counts_G],
            input_split_sizes=[int(c) for c in send_counts_G],
            group=self.group,
        )
        return out

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)
