"""The two interfaces the engine's parts plug into, declared once.

    Engine ──forward──▶ Executor ──forward(layer, h)──▶ FfnProvider
                        ModelExecutor (this process)    DenseFfn, NaiveFlashFfn (workers/ffn_providers.py)
                        WorkerExecutor (worker runtime) SparseFlashFfn (workers/sparse_ffn.py)
                                                        PipelineFfn (workers/compute.py, the compute worker's)

Both are typing.Protocols: a class conforms by having the members. The
implementations also inherit from them, which gives them the defaults of the
optional members (a provider without per-step state takes the no-op
begin_step, an executor without worker processes never restarts any), so the
callers call every member without asking whether it is there.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from flashllm.protocol.store_format import Manifest
    from flashllm.workers.engine_config import EngineConfig
    from flashllm.workers.ffn_providers import FfnStats


@runtime_checkable
class FfnProvider(Protocol):
    """Where a layer's FFN comes from: y = FFN_layer(h), and what that cost (stats, reset per decode step)."""

    stats: "FfnStats"

    def forward(self, layer: int, h: "torch.Tensor") -> "torch.Tensor":
        """h (N, d) → y (N, d) for one layer."""
        ...

    def begin_step(self, batch: int, steps: int, slots: "np.ndarray | None" = None,
                   starts: "np.ndarray | None" = None) -> None:
        """Before a forward pass of B sequences × T new tokens each (T > 1: prefill). slots (B,): each
        sequence's KV slot, its identity while it runs; starts (B,) bool: the sequence starts in this step
        (its first position is 0)."""

    def release_slot(self, slot: int) -> None:
        """A sequence left its KV-cache slot."""

    def close(self) -> None:
        ...


@runtime_checkable
class Executor(Protocol):
    """Runs the model for the engine: logits for token ids at positions in KV-cache slots."""

    runtime: str  # where the model runs: "inproc" or "workers"
    device: str

    @classmethod
    def from_config(cls, store_dir: str, manifest: "Manifest", config: "EngineConfig") -> "Executor":
        """The executor a resolved EngineConfig (mode, runtime, max_context decided) asks for."""
        ...

    def forward(self, token_ids: "torch.Tensor", slots: "torch.Tensor", positions: "torch.Tensor",
                logit_steps: "torch.Tensor | None" = None) -> "torch.Tensor":
        """token_ids/positions (B, T), slots (B,) → logits float32 on the CPU, (B, T, V), or (B, V) for the step
        logit_steps (B,) names in each sequence; writes those slots' KV."""
        ...

    @property
    def ffn_stats(self) -> "FfnStats":
        """The FFN's accounting since its last reset (the engine resets it per decode step)."""
        ...

    def flash_read_bytes(self) -> int:
        """Bytes the reading process has read from the device so far (/proc/<pid>/io), a growing counter."""
        ...

    def release_slot(self, slot: int) -> None:
        ...

    def recover(self, error: BaseException) -> bool:
        """After a step failed with `error`: True when the executor restarted what broke and can step again."""
        return False

    def check_workers(self) -> bool:
        """Between steps: restart worker processes that died meanwhile; True if it did."""
        return False

    def interrupt(self) -> None:
        """From another thread: make a step that is stuck on a worker fail now."""

    def close(self) -> None:
        ...
