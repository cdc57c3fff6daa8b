"""Live tensor bytes, by storage, of whatever runs inside a ``StorageTracker`` (real or fake tensors).

A ``TorchDispatchMode`` sees every op's outputs; each storage seen for the first time is counted
(``nbytes``) and a ``weakref.finalize`` on the storage's Python object subtracts it when torch frees
the storage (torch keeps one Python object per live storage, so the finaliser runs when the storage
itself dies, not when one of its views does). Views share their base's storage and are not
counted twice. Tensors made before tracking starts (parameters, optimizer states) are registered
with ``adopt`` and so count from the start.

Each storage is tagged with the phase in which it was allocated (``forward``, ``backward``,
``optimizer``, set by the caller); ``peak_snapshot`` keeps, at the peak, the bytes of every live
storage by tag. The caller classifies them (``healthgpt.training.plan.trace``): parameters,
gradients and optimizer states by identity, the rest by the phase that made them (forward ->
activations, later -> temporaries).

With ``flops`` (a mapping op packet -> formula, ``torch.utils.flop_counter``'s registry plus our
additions), the same mode also counts FLOPs per phase (``flops_by_phase``). torch's own
``FlopCounterMode`` is not used: its module tracker keeps tensors alive (under gradient
checkpointing it raised a traced M3 step's peak from 1.9 to 10.4 GB).

Under ``FakeTensorMode`` nothing is allocated but storages still exist (with their sizes) and still
die when unreferenced, so the same accounting predicts a step with no memory at all.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["StorageTracker", "storage_key"]


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (stable while the storage lives)."""
    return t.untyped_storage()._cdata


class StorageTracker(TorchDispatchMode):
    """Counts live storage bytes; ``peak``, ``peak_live`` (key -> (bytes, phase)) at the peak."""

    def __init__(self, flops: dict[Any, Any] | None = None) -> None:
        super().__init__()
        self.flop_formulas = flops or {}
        self.flops_by_phase: dict[str, int] = {}
        self.live: dict[int, tuple[int, str]] = {}
        self.current = 0
        self.peak = 0
        self.peak_live: dict[int, tuple[int, str]] = {}
        self.phase = "setup"
        self._finalizers: list[Any] = []

    def adopt(self, tensors: Iterable[torch.Tensor | None], phase: str = "setup") -> None:
        """Count tensors that exist already (parameters, gradients, optimizer states)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._see(t, phase)

    def _see(self, t: torch.Tensor, phase: str) -> None:
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse/nested: not used here
            return
        key = st._cdata
        if key in self.live:
            return
        nbytes = int(st.nbytes())
        self.live[key] = (nbytes, phase)
        self.current += nbytes
        self._finalizers.append(weakref.finalize(st, self._free, key))
        if self.current > self.peak:
            self.peak = self.current
            self.peak_live = dict(self.live)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.flop_formulas.get(func._overloadpacket)
        if formula is not None:
            n = int(formula(*args, **kwargs, out_val=out))
            self.flops_by_phase[self.phase] = self.flops_by_phase.get(self.phase, 0) + n
        flat, _ = tree_flatten(out)
        for t in flat:
            if isinstance(t, torch.Tensor):
                self._see(t, self.phase)
        return out

    def reset_peak(self) -> None:
        self.peak = self.current
        self.peak_live = dict(self.live)

    def close(self) -> None:
        for f in self._finalizers:
            f.detach()
        self._finalizers.clear()
