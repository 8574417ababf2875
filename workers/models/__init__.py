"""Model math per architecture family; one file each, no run loop in here."""
from __future__ import annotations

import torch

from flashllm.protocol.store_format import ArchConfig


def build_model(arch: ArchConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: str,
                resident_dtype: torch.dtype | None = None):
    """The resident part of the model (embeddings, attention, norms, head) for arch.family, computing in dtype
    with its matrices held in resident_dtype (default: dtype)."""
    from flashllm.workers.models.llama import LlamaModel
    from flashllm.workers.models.opt import OptModel

    families = {"llama": LlamaModel, "opt": OptModel}
    return families[arch.family](arch, weights, dtype, device, resident_dtype)
