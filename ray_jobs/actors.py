"""Ray actors of a profiling job: thin ``@ray.remote`` shells over ``ray_jobs.shards`` and ``ray_jobs.ep_forward``.

``ProfileWorker`` (data-parallel): loads the whole model once, traces whole shards. ``EPWorker`` (expert-
parallel): one rank of a gloo/nccl process group; every rank gets every shard and traces its share of it.
Each shard call carries its own prompt texts (the actors hold no job-wide input, so a restarted actor needs
nothing from the object store). Both report their pid, so a test or an operator can kill one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import ray

from ray_jobs.shards import ShardResult, trace_shard

__all__ = ["EPWorker", "ProfileWorker"]


class _Worker:
    def __init__(self, model: str, out_dir: str, batch_size: int, max_len: int, threads: int) -> None:
        import torch

        from profiler.api import load_model

        torch.set_num_threads(threads)
        self.loaded = load_model(model)
        self.meta = self.loaded.trace_meta()
        self.out_dir = Path(out_dir)
        self.batch_size = batch_size
        self.max_len = max_len

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class ProfileWorker(_Worker):
    """Data-parallel worker: ``run_shard`` traces whole shards with the single-process profiler."""

    def run_shard(self, shard: int, prompt_ids: Sequence[int], texts: Sequence[str]) -> ShardResult:
        from profiler.api import profile_prompts

        return trace_shard(
            self.out_dir,
            self.meta,
            shard,
            lambda w: profile_prompts(
                self.loaded, texts, list(prompt_ids), w, batch_size=self.batch_size, max_len=self.max_len
            ),
        )


@ray.remote
class EPWorker(_Worker):
    """Expert-parallel rank: ``join`` forms the process group, ``run_shard`` is collective over all ranks."""

    def join(self, rank: int, world: int, master_addr: str, master_port: int, backend: str) -> int:
        import torch
        import torch.distributed as dist

        from placement.runtime.dispatch import DistExchanger
        from ray_jobs.ep_forward import shard_experts

        if master_addr.startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
        self.ex = DistExchanger(torch.device("cpu"))
        shard_experts(self.loaded, self.ex)
        return rank

    def run_shard(self, shard: int, prompt_ids: Sequence[int], texts: Sequence[str]) -> ShardResult:
        from ray_jobs.ep_forward import ep_profile_prompts

        return trace_shard(
            self.out_dir,
            self.meta,
            shard,
            lambda w: ep_profile_prompts(
                self.loaded, self.ex, texts, list(prompt_ids), w, batch_size=self.batch_size, max_len=self.max_len
            ),
            rank=self.ex.rank,
        )

    def free_port(self) -> int:
        from placement.runtime.launch import free_port

        return free_port()

    def node_ip(self) -> str:
        return str(ray.util.get_node_ip_address())
