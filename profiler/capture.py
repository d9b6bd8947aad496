"""Routing capture: read each MoE router's decision, as the model used it, with forward hooks.

Two pieces:

* :class:`RouterAdapter` — the per-model-family interface. It finds the router modules of a model
  and reads the routing decision out of a router module's forward output. Adding a model family
  (e.g. in ``profiler/hf_adapters.py``) means writing one small class with these two methods::

      class MixtralAdapter:
          def find_routers(self, model):            # -> [(moe_layer_id, module), ...]
              return [(i, layer.mlp.gate) for i, layer in enumerate(model.model.layers)]

          def read_decision(self, module, inputs, output):  # -> (topk_ids_TK, topk_weights_TK)
              logits_TE = output[0]                   # whatever the hooked module returns
              w, ids = torch.topk(logits_TE.softmax(-1), 2, dim=-1)
              return ids, w / w.sum(-1, keepdim=True)

  Hook the module whose output *is* the decision (or determines it exactly); ``read_decision``
  must return tensors on the model's device, ids integer ``[T, K]``, weights float ``[T, K]``, with
  T in the same token order as the model's flattened ``[B, S]`` input (row-major).

* :class:`RoutingRecorder` — a context manager that installs hooks on every router found by an
  adapter, keeps the decisions of the current forward on-device, and on :meth:`RoutingRecorder.pop`
  stacks all layers, drops padded tokens and copies to host once per forward.

Dimension key:
    B  batch, S sequence length
    T  tokens (B * S flattened, row-major)
    L  MoE layers (in the adapter's order, sorted by layer id)
    K  experts chosen per token (top-k)
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

__all__ = ["CaptureError", "DemoMoEAdapter", "RouterAdapter", "RoutingRecorder"]


class CaptureError(RuntimeError):
    """Routing capture went wrong (no routers, a layer missing or seen twice in one forward, ...)."""


@runtime_checkable
class RouterAdapter(Protocol):
    """How to find and read the routers of one model family."""

    def find_routers(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """``(moe_layer_id, module)`` for every MoE layer; layer id = the model's block index."""
        ...

    def read_decision(
        self, module: nn.Module, inputs: tuple[Any, ...], output: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """From a forward hook's ``(module, inputs, output)``: ``(topk_ids_TK, topk_weights_TK)``."""
        ...


class DemoMoEAdapter:
    """Adapter for :class:`profiler.model.DemoMoE`: its ``Router`` returns the decision directly."""

    def find_routers(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        from profiler.model import DemoMoE

        if not isinstance(model, DemoMoE):
            raise CaptureError(f"DemoMoEAdapter needs a DemoMoE, got {type(model).__name__}")
        return [(layer_id, router) for layer_id, router in model.routers()]

    def read_decision(
        self, module: nn.Module, inputs: tuple[Any, ...], output: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        topk_ids_TK, topk_weights_TK = output
        return topk_ids_TK, topk_weights_TK


class RoutingRecorder:
    """Records every router decision of each forward pass.

    Usage::

        with RoutingRecorder(model, adapter) as rec:
            model(input_ids_BS)
            expert_ids_TLK, gate_weights_TLK = rec.pop(valid_T)

    ``pop`` must be called once after each forward; a layer firing twice before ``pop`` (or a layer
    missing) raises :class:`CaptureError`.
    """

    def __init__(self, model: nn.Module, adapter: RouterAdapter) -> None:
        found = sorted(adapter.find_routers(model), key=lambda pair: pair[0])
        if not found:
            raise CaptureError(f"no MoE routers found in {type(model).__name__} by {type(adapter).__name__}")
        self.layers: tuple[int, ...] = tuple(layer_id for layer_id, _ in found)
        if len(set(self.layers)) != len(self.layers):
            raise CaptureError(f"adapter returned repeated layer ids {list(self.layers)}")
        self._modules = [module for _, module in found]
        self._adapter = adapter
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._ids: list[torch.Tensor | None] = [None] * len(found)
        self._weights: list[torch.Tensor | None] = [None] * len(found)

    def _make_hook(self, slot: int) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if self._ids[slot] is not None:
                raise CaptureError(
                    f"MoE layer {self.layers[slot]} ran twice before pop(); call pop() after each forward"
                )
            ids_TK, weights_TK = self._adapter.read_decision(module, inputs, output)
            self._ids[slot] = ids_TK.detach()
            self._weights[slot] = weights_TK.detach()

        return hook

    def __enter__(self) -> RoutingRecorder:
        self._handles = [m.register_forward_hook(self._make_hook(i)) for i, m in enumerate(self._modules)]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        """Forget the decisions of the current forward."""
        self._ids = [None] * len(self._modules)
        self._weights = [None] * len(self._modules)

    def pop(self, valid_T: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decisions of the last forward as host arrays and reset.

        ``valid_T``: optional bool ``[T]`` mask of real (non-padding) tokens, on the model's device.
        Returns ``expert_ids_TLK`` int16 and ``gate_weights_TLK`` float32 of the kept tokens.
        """
        missing = [layer for layer, t in zip(self.layers, self._ids, strict=True) if t is None]
        if missing:
            raise CaptureError(f"MoE layers {missing} did not run in this forward")
        ids = [t for t in self._ids if t is not None]
        weights = [t for t in self._weights if t is not None]
        shapes = {tuple(t.shape) for t in ids}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise CaptureError(f"router decisions must all be [T, K], got shapes {sorted(shapes)}")
        self.clear()
        # One device->host copy per forward: ids (exact in float32 below 2**24) and weights together.
        packed_TL2K = torch.stack(
            [torch.stack([i.float(), w.float()], dim=1) for i, w in zip(ids, weights, strict=True)], dim=1
        )
        if valid_T is not None:
            if valid_T.shape != packed_TL2K.shape[:1]:
                raise CaptureError(
                    f"valid mask has shape {tuple(valid_T.shape)}, routing has {packed_TL2K.shape[0]} tokens"
                )
            packed_TL2K = packed_TL2K[valid_T]
        host = packed_TL2K.cpu().numpy()
        expert_ids_TLK = host[:, :, 0, :].astype(np.int16)
        gate_weights_TLK = np.ascontiguousarray(host[:, :, 1, :], dtype=np.float32)
        return expert_ids_TLK, gate_weights_TLK
