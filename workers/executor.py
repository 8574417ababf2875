"""The model executor: one forward pass over resident weights + an FFN provider + the KV cache.

The engine (runtime/engine.py) owns requests, sampling and text; it asks an
executor for logits. In-process this class is the executor; in the worker
runtime the compute worker wraps the same class and the engine talks to it
over protocol/ messages, so both runtimes compute the same thing.
"""
from __future__ import annotations

import os

import torch

from flashllm.protocol.store_format import Manifest
from flashllm.workers.engine_config import FFN_MODES, EngineConfig, SparseOptions
from flashllm.workers.flash_io.io_counters import process_read_bytes
from flashllm.workers.interfaces import Executor, FfnProvider
from flashllm.workers.models import build_model
from flashllm.workers.models.attention import KVCache
from flashllm.workers.models.resident import (
    EMBEDDING_NAME, HEAD_NAME, StoreBackedMatrix, StoredBlocks, resident_dtype_of, with_quantized_blocks,
)
from flashllm.workers.store_reader import drop_file_cache, load_resident_weights, stored_matrix_rows


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def compute_dtype(device: str) -> torch.dtype:
    # CPU kernels are fastest and exact in float32; GPUs run float16.
    return torch.float32 if device == "cpu" else torch.float16


class DeviceMemoryError(ValueError):
    """The model as configured cannot fit in the accelerator's free memory; the message says what to lower."""


def device_bytes_needed(store_dir: str, manifest: Manifest, mode: str, num_slots: int, max_context: int,
                        dtype: torch.dtype, resident_dtype: torch.dtype, capacity_rows: list[int] | None = None,
                        device: str = "cuda") -> dict[str, int]:
    """What an executor allocates on its device before any activation: the memory plan's device_bytes for
    this mode, with no budget (the sparse caches are capacity_rows, every neuron when not given)."""
    from flashllm.workers.memory_plan import MemoryInputs, kv_cache_bytes_of, plan_memory_for

    inputs = MemoryInputs(mode=mode, budget_bytes=None, compute_itemsize=dtype.itemsize,
                          kv_cache_bytes=kv_cache_bytes_of(manifest, num_slots, max_context, dtype.itemsize),
                          device=device, resident_itemsize=resident_dtype.itemsize,
                          capacity_rows=tuple(capacity_rows) if capacity_rows else None)
    return plan_memory_for(store_dir, manifest, inputs).device_bytes


def check_device_memory(needed: dict[str, int], free_bytes: int, device: str, mode: str) -> None:
    """Refuse before allocating what surely cannot fit (a clear error instead of an out-of-memory midway)."""
    total = sum(needed.values())
    if total <= free_bytes:
        return
    mib = 2**20
    parts = ", ".join(f"{name} {size / mib:.0f}" for name, size in needed.items())
    fixes = {"dense": "use --mode sparse with --memory (the FFN stays on flash)",
             "naive": "lower --max-context or --max-batch, or use --resident-dtype float16",
             "sparse": "lower --memory (smaller neuron caches), --max-context or --max-batch"}[mode]
    raise DeviceMemoryError(f"--mode {mode} on {device} needs {total / mib:.0f} MiB of its memory ({parts} MiB) but "
                            f"{free_bytes / mib:.0f} MiB are free: {fixes}, or run on the CPU "
                            "(CUDA_VISIBLE_DEVICES=)")


def check_fits_on_device(store_dir: str, manifest: Manifest, mode: str, num_slots: int, max_context: int,
                         device: str, resident_dtype: str | None = None, capacity_rows: list[int] | None = None) -> None:
    """On a GPU, check_device_memory for what this executor is about to allocate there; nothing on the CPU."""
    if torch.device(device).type != "cuda" or mode not in FFN_MODES:
        return
    dtype = compute_dtype(device)
    needed = device_bytes_needed(store_dir, manifest, mode, num_slots, max_context, dtype,
                                 resident_dtype_of(resident_dtype, dtype, manifest.ffn.dtype), capacity_rows, device)
    check_device_memory(needed, torch.cuda.mem_get_info(device)[0], device, mode)


def make_ffn_provider(mode: str, store_dir: str, manifest: Manifest, dtype: torch.dtype, device: str,
                      sparse: SparseOptions | None = None, naive_held_rows: tuple[int, ...] | None = None
                      ) -> FfnProvider:
    """The FFN provider of `mode`; sparse: --mode sparse's options (None: the defaults); naive_held_rows: the
    rows per layer --mode naive holds (whole layers or 0; None: none held)."""
    from flashllm.workers.ffn_providers import DenseFfn, NaiveFlashFfn

    if mode == "dense":
        return DenseFfn(store_dir, manifest, dtype, device)
    if mode == "naive":
        return NaiveFlashFfn(store_dir, manifest, dtype, device, capacity_rows=naive_held_rows)
    if mode == "sparse":
        from flashllm.workers.predictor import require_predictors
        from flashllm.workers.sparse_ffn import SparseFlashFfn

        require_predictors(store_dir, manifest, sparse)

        return SparseFlashFfn(store_dir, manifest, dtype, device, sparse or SparseOptions())
    raise ValueError(f"--mode {mode!r} is not one of {', '.join(FFN_MODES)}")


def store_backed_names(manifest: Manifest, device: str) -> frozenset[str]:
    """Resident matrices that a CPU reads from the store as StoreBackedMatrix (a quantized embedding table and
    head) instead of loading them with the rest."""
    if torch.device(device).type != "cpu":
        return frozenset()
    return frozenset(name for name in (EMBEDDING_NAME, HEAD_NAME) if name in manifest.resident_quantized)


def back_with_store(weights: dict, store_dir: str, manifest: Manifest, names: frozenset[str], verify: bool,
                    head_4bit: bool = False) -> None:
    """The store_backed_names as StoreBackedMatrix entries of weights: the embedding table looked up from the
    store row by row, and a quantized head (tied or not) held from chunks read as it is converted (head_4bit:
    a q8_0 head as a 4-bit sketch), with its top logits recomputed from the stored rows
    (resident.StoreBackedMatrix)."""
    for name in names:
        rows = stored_matrix_rows(store_dir, manifest, name)
        blocks = StoredBlocks(rows, manifest.resident_sha256.get(name) if verify else None, head_4bit)
        is_head = name == HEAD_NAME or manifest.arch.tie_word_embeddings
        if not is_head and verify:
            blocks.verify()  # looked up, never held: its checksum is still checked once
        weights[name] = StoreBackedMatrix(rows, blocks if is_head else None)


class ModelExecutor(Executor):
    runtime = "inproc"

    def __init__(self, store_dir: str, manifest: Manifest, mode: str, num_slots: int, max_context: int,
                 device: str | None = None, verify: bool = True, ffn: FfnProvider | None = None,
                 sparse: SparseOptions | None = None, resident_dtype: str | None = None,
                 naive_held_rows: tuple[int, ...] | None = None, head_precision: str = "stored"):
        """sparse: --mode sparse's options (None: the defaults); naive_held_rows: the layers --mode naive holds
        (the memory plan's); ffn: a provider already made, used as is; head_precision: "4bit" holds a q8_0
        head as a 4-bit sketch (the engine resolves "auto" before: mode_choice.resolve_head_precision)."""
        arch = self.arch = manifest.arch
        self.device = device or default_device()
        self.dtype = compute_dtype(self.device)
        # matrices may be held narrower than they are computed in (half the resident bytes)
        self.resident_dtype = resident_dtype_of(resident_dtype, self.dtype, manifest.ffn.dtype)
        if ffn is None:  # (a caller passing its FFN checked before making it)
            check_fits_on_device(store_dir, manifest, mode, num_slots, max_context, self.device, resident_dtype,
                                 sparse.capacity_rows if sparse is not None else None)
        store_backed = store_backed_names(manifest, self.device)
        weights = with_quantized_blocks(load_resident_weights(store_dir, manifest, verify=verify, skip=store_backed))
        drop_file_cache(os.path.join(store_dir, manifest.resident_file))  # the tensors are copies: drop the pages now
        back_with_store(weights, store_dir, manifest, store_backed, verify, head_precision == "4bit")
        self.model = build_model(arch, weights, self.dtype, self.device, self.resident_dtype)
        del weights
        self.kv = KVCache(arch.num_hidden_layers, num_slots, arch.num_key_value_heads, max_context,
                          arch.head_dim, self.dtype, self.device)
        self.ffn = ffn if ffn is not None else make_ffn_provider(mode, store_dir, manifest, self.dtype, self.device,
                                                                 sparse, naive_held_rows)
        # the FFN's scale tables come from the same file: their pages are copies now too
        drop_file_cache(os.path.join(store_dir, manifest.resident_file))

    @classmethod
    def from_config(cls, store_dir: str, manifest: Manifest, config: EngineConfig) -> "ModelExecutor":
        return cls(store_dir, manifest, config.mode, config.max_batch, config.max_context, device=config.device,
                   verify=config.verify, sparse=config.sparse_options, resident_dtype=config.resident_dtype,
                   naive_held_rows=config.naive_held_rows, head_precision=config.head_precision)

    def forward(self, token_ids: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                logit_steps: torch.Tensor | None = None) -> torch.Tensor:
        """token_ids/positions (B, T), slots (B,) → logits float32 on the CPU: (B, T, V), or (B, V) with
        logit_steps (B,), each sequence's step whose logits are wanted (a prompt's last token).

        Writes the KV cache of those slots."""
        token_ids, slots, positions = (t.to(self.device) for t in (token_ids, slots, positions))
        with torch.inference_mode():
            x = self.model.embed(token_ids, positions)  # (B, T, d)
            batch, steps, d = x.shape
            step = self.model.step_inputs(slots, positions)
            self.ffn.begin_step(batch, steps, slots.cpu().numpy(), (positions[:, 0] == 0).cpu().numpy())
            for layer in range(self.arch.num_hidden_layers):
                x = self.model.attention(layer, x, step, self.kv)
                h = self.model.ffn_input(layer, x).reshape(batch * steps, d)  # (N, d)
                y = self.ffn.forward(layer, h).reshape(batch, steps, d)
                x = self.model.ffn_residual(layer, x, y)
            if logit_steps is not None:  # the head is a prompt's largest product: only the rows used
                x = x[torch.arange(batch, device=x.device), logit_steps.to(x.device)][:, None]  # (B, 1, d)
            # on the CPU whatever the device, like the worker runtime's (sampling and scoring run there)
            logits = self.model.logits(x).float().cpu()  # (B, T or 1, V)
            return logits if logit_steps is None else logits[:, 0]  # (B, T, V) or (B, V)

    @property
    def ffn_stats(self):
        """FfnStats of the FFN provider since its last reset (the engine resets it per decode step)."""
        return self.ffn.stats

    def flash_read_bytes(self) -> int:
        """Bytes this process has read from the device (/proc/self/io): the FFN reads happen here.
        The worker runtime's executor keeps the same counter for its prefetch worker."""
        return process_read_bytes()

    def release_slot(self, slot: int) -> None:
        """A sequence left its slot (the KV rows are simply overwritten by the next user)."""
        self.ffn.release_slot(slot)

    def close(self) -> None:
        self.ffn.close()
