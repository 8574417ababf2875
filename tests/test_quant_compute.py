"""Quantized resident matrices: held in the kernels' own layouts, products against a dequantized reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flashllm.workers.models.quant_linear import (
    BLOCK_WEIGHTS, Int4Matrix, QuantizedBlocks, dequantize, hold_quantized,
)

# bfloat16 activations round x to 8 significant bits: the products' relative error, measured ~4e-3 worst case
BF16_PRODUCT_RTOL = 1.5e-2


def quantize_rows(kind: str, w: np.ndarray) -> np.ndarray:
    """Round-to-nearest blocks of w (out, in) float → (out, bytes_per_row) uint8, GGUF's reference math
    (convert owns quantization; this copy lets the compute tests run on their own)."""
    out, inner = w.shape
    g = w.astype(np.float32).reshape(out, inner // BLOCK_WEIGHTS, BLOCK_WEIGHTS)  # (out, G, 32)
    if kind == "q8_0":
        d = (np.abs(g).max(-1) / 127).astype(np.float16)  # (out, G)
        inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d.astype(np.float32)))
        q = np.clip(np.round(g * inv[..., None]), -127, 127).astype(np.int8)
        return np.concatenate((d[..., None].view(np.uint8), q.view(np.uint8)), -1).reshape(out, -1)
    if kind == "q4_1":
        lo, hi = g.min(-1), g.max(-1)
        d = ((hi - lo) / 15).astype(np.float16)
        m = lo.astype(np.float16)
        inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d.astype(np.float32)))
        q = np.clip(np.round((g - m.astype(np.float32)[..., None]) * inv[..., None]), 0, 15).astype(np.uint8)
        head = np.concatenate((d[..., None].view(np.uint8), m[..., None].view(np.uint8)), -1)
    else:
        idx = np.abs(g).argmax(-1)
        maxv = np.take_along_axis(g, idx[..., None], -1)[..., 0]
        d = (maxv / -8).astype(np.float16)
        inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d.astype(np.float32)))
        q = np.clip(np.round(g * inv[..., None] + 8), 0, 15).astype(np.uint8)
        head = d[..., None].view(np.uint8)
    qs = q[..., :16] | (q[..., 16:] << 4)  # (out, G, 16)
    return np.concatenate((head, qs), -1).reshape(out, -1)


def blocks_of(kind: str, w: np.ndarray) -> QuantizedBlocks:
    return QuantizedBlocks(kind, torch.from_numpy(quantize_rows(kind, w)), w.shape)


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8_0"])
def test_dequantize_is_within_a_block_step_of_the_weights(kind):
    w = np.random.default_rng(0).normal(0, 0.05, (40, 96)).astype(np.float32)
    back = dequantize(blocks_of(kind, w)).numpy()
    grouped = w.reshape(40, 3, 32)
    step = {"q4_0": np.abs(grouped).max(-1) / 8, "q4_1": np.ptp(grouped, -1) / 15,
            "q8_0": np.abs(grouped).max(-1) / 127}[kind]  # (40, 3) one quantization step per block
    # half a step (round to nearest), but Q4_0 clips its positive end at 7 steps of a block whose extreme is -8
    allowed = step * (1.01 if kind == "q4_0" else 0.51)  # (40, 3)
    assert (np.abs(back - w).reshape(40, 3, 32) <= allowed[..., None] + 1e-6).all()


@pytest.mark.parametrize("kind,rows", [("q4_0", 64), ("q4_1", 72), ("q8_0", 40)])
@pytest.mark.parametrize("batch", [1, 3, 20])
def test_quantized_product_matches_dequantized_reference(kind, rows, batch):
    rng = np.random.default_rng(1)
    blocks = blocks_of(kind, rng.normal(0, 0.05, (rows, 128)).astype(np.float32))
    x = torch.from_numpy(rng.normal(0, 1, (batch, 2, 128)).astype(np.float32))
    ref = x.double() @ dequantize(blocks).double().T  # (batch, 2, rows)
    held = hold_quantized(blocks, torch.float32, "cpu")
    from flashllm.workers.models.resident import linear

    y = linear(x, held)
    assert y.shape == (batch, 2, rows) and y.dtype == torch.float32
    assert relative_error(y, ref) < BF16_PRODUCT_RTOL


def test_held_bytes_are_the_stored_bits_not_a_float_copy():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.05, (256, 576)).astype(np.float32)
    int4 = Int4Matrix(blocks_of("q4_1", w))
    # 4 bits a weight + a bfloat16 (scale, zero) per 32: 20 bytes per 32 weights, as Q4_1 stores them
    assert int4.nbytes == 256 * 576 // 32 * 20
    # q8_0: one int8 a weight and a bfloat16 scale per row (the blocks' per-32 scales are folded in)
    assert hold_quantized(blocks_of("q8_0", w), torch.float32, "cpu").nbytes == 256 * 576 + 256 * 2


@pytest.mark.parametrize("rows,inner", [(64, 64), (3072, 576), (576, 1536)])
def test_int4_tile_packing_is_torchs_own_layout(rows, inner):
    from flashllm.workers.models.quant_linear import pack_int4_tiles

    q = torch.randint(0, 16, (rows, inner), dtype=torch.uint8)
    assert torch.equal(pack_int4_tiles(q), torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))


@pytest.mark.parametrize("kind,block_bytes", [("q4_0", 18), ("q4_1", 20)])
def test_rows_written_one_at_a_time_at_any_slot_are_the_bytes_torchs_packing_gives(kind, block_bytes):
    from flashllm.workers.flash_io.kernel_layout import write_q4_rows
    from flashllm.workers.models.quant_linear import pack_int4_tiles, split_blocks

    rng = np.random.default_rng(3)
    blocks = blocks_of(kind, rng.standard_normal((128, 96)).astype(np.float32))  # two tiles of 64 rows
    raw = blocks.raw.numpy()  # (128, 3 blocks)
    q = split_blocks(blocks)[2].clone()  # (128, 96) the 4-bit values
    packed = torch.zeros(128, 48, dtype=torch.uint8)
    order = rng.permutation(128)  # the low and the high row of a byte written apart, in any order
    for part in np.array_split(order, 5):
        write_q4_rows(packed.numpy(), part, raw[part], 0, block_bytes, 96)
    assert torch.equal(packed, pack_int4_tiles(q))
    write_q4_rows(packed.numpy(), np.array([70]), raw[[5]], 0, block_bytes, 96)
    q[70] = q[5]  # one row rewritten: its tile-mate (row 102) keeps its nibbles
    assert torch.equal(packed, pack_int4_tiles(q))
    at_once = torch.zeros(128, 48, dtype=torch.uint8)
    write_q4_rows(at_once.numpy(), order, raw[order], 0, block_bytes, 96)  # every byte's two rows in one call
    assert torch.equal(at_once, pack_int4_tiles(split_blocks(blocks)[2]))
    twice = np.array([7, 39, 7, 100])  # 7 and 39 share bytes; 7 given twice: its last bundle is the one kept
    write_q4_rows(at_once.numpy(), twice, raw[[0, 1, 2, 3]], 0, block_bytes, 96)
    q = split_blocks(blocks)[2].clone()
    q[[7, 39, 100]] = q[[2, 1, 3]]
    assert torch.equal(at_once, pack_int4_tiles(q))
    with pytest.raises(IndexError, match="rows must be in"):
        write_q4_rows(packed.numpy(), np.array([128]), raw[[0]], 0, block_bytes, 96)


def test_q8_0_rows_are_rescaled_within_half_a_row_step_and_the_error_is_reported():
    rng = np.random.default_rng(7)
    w = rng.normal(0, 0.05, (300, 96)).astype(np.float32)
    w[5, 3] = 0.9  # an outlier widens its row's step, not the others'
    w[7] = 0  # a zero row stays zero
    blocks = blocks_of("q8_0", w)
    held = hold_quantized(blocks, torch.float32, "cpu")
    stored = dequantize(blocks)  # (300, 96) what the file holds
    back = held.rows(torch.arange(300), torch.float32)
    row_step = stored.abs().amax(1) / 127  # (300,)
    assert ((back - stored).abs() <= row_step[:, None] * 0.51 + 1e-7).all()
    assert torch.equal(back[7], torch.zeros(96))
    assert held.requantize_max_abs_error == pytest.approx(float((back - stored).abs().max()), rel=1e-5)
    assert held.requantize_max_abs_error > float(row_step[0]) * 0.1  # reported, not zero


@pytest.mark.parametrize("kind", ["q8_0", "q4_1", "q4_0"])
def test_embedding_rows_dequantize_only_the_ids_asked_for(kind):
    w = np.random.default_rng(3).normal(0, 0.05, (150, 64)).astype(np.float32)
    blocks = blocks_of(kind, w)
    ids = torch.tensor([[3, 149], [0, 100], [35, 70]])  # both nibble halves of the int4 tiles
    from flashllm.workers.models.resident import embedding_rows

    rows = embedding_rows(hold_quantized(blocks, torch.float32, "cpu"), ids, torch.float32)  # (3, 2, 64)
    # int4 scales are held in bfloat16 (the kernel's type): equal to its rounding
    # q8_0 is re-rounded to one scale per row: half a row step, 1/254 of the row's largest weight
    tolerance = (1 / 254 + 1e-4 if kind == "q8_0" else 1e-2) * float(np.abs(w).max())
    assert torch.allclose(rows, dequantize(blocks)[ids], atol=tolerance, rtol=0)


@pytest.mark.parametrize("width", [49152, 32000, 8191, 100])
def test_a_heads_top_positions_are_those_one_topk_over_the_row_gives(width):
    from flashllm.workers.models.resident import top_indices

    generator = torch.Generator().manual_seed(width)
    logits = torch.stack([torch.randperm(width, generator=generator).float() for _ in range(3)])  # (3, V) distinct
    logits[1, -5:] += width  # the largest in the last, shorter group
    logits[2, :40] += width  # more of the largest than k in the first group
    for k in (1, 32):
        got = top_indices(logits, k)  # (3, k)
        assert got.shape == (3, k)
        assert [sorted(row) for row in got.tolist()] == [sorted(row) for row in logits.topk(k, dim=-1).indices.tolist()]


def test_blocks_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match="must be .* uint8"):
        QuantizedBlocks("q4_1", torch.zeros(4, 19, dtype=torch.uint8), (4, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedBlocks("q8_0", torch.zeros(4, 34, dtype=torch.uint8), (4, 40))


# ---- FFN neurons of a quantized store ------------------------------------------------------------

def quantized_layout_and_bundles(kind: str, n_ff: int = 96, d: int = 64, seed: int = 4):
    """A gated layout of `kind` gate/up rows and `kind` down blocks (values in the bundles, scales in a
    table), n_ff random bundles in it and the layer's down scale table."""
    from flashllm.protocol import quant_format as qf
    from flashllm.protocol.store_format import DOWN_GROUP_SCALES_NAME, FfnLayerRegion, FfnLayout

    parts = [("gate", d, kind), ("up", d, kind), ("down", d, qf.GROUPED_COLUMN_KINDS[kind])]
    rng = np.random.default_rng(seed)
    rows = [qf.quantize_rows(kind, rng.normal(0, 0.1, (n_ff, d)).astype(np.float32)) for _ in range(2)]
    down_values, scales = qf.quantize_down_columns(kind, rng.normal(0, 0.1, (d, n_ff)).astype(np.float32))
    bundles = np.concatenate(rows + [down_values], axis=1)  # (n_ff, bundle_bytes)
    layout = FfnLayout(file="ffn.bin", dtype=kind, alignment_bytes=4096, bundle_parts=parts,
                       bundle_bytes=bundles.shape[1], file_bytes=bundles.nbytes,
                       layers=[FfnLayerRegion(offset_bytes=0, length_bytes=bundles.nbytes, num_neurons=n_ff,
                                              sha256="")], down_group_scales=DOWN_GROUP_SCALES_NAME)
    return layout, bundles, scales


def reference_ffn(layout, bundles: np.ndarray, scales: np.ndarray, ids: np.ndarray, h: torch.Tensor) -> torch.Tensor:
    from flashllm.workers.models.ffn import BundleColumns, ffn_from_rows
    from flashllm.workers.store_reader import bundle_rows_as_float as dequantize_bundles

    rows = torch.from_numpy(dequantize_bundles(layout, bundles[ids], scales, ids)).double()  # (k, E)
    return ffn_from_rows(h.double(), rows, BundleColumns.from_layout(layout.part_slices()))


@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "q8_0"])
def test_neuron_matrix_slots_written_one_by_one_multiply_like_the_dequantized_rows(kind):
    from flashllm.workers.models.quant_ffn import QuantNeuronMatrix

    layout, bundles, scales = quantized_layout_and_bundles(kind)
    matrix = QuantNeuronMatrix(layout, capacity=70, down_scales=scales)  # 128 slots: two int4 tiles
    assert matrix.capacity == 128
    order = np.random.default_rng(5).permutation(96)[:70]  # neurons in a cache's arbitrary order
    matrix.write(np.arange(70), bundles[order[::-1]], order[::-1])  # first fill, then overwrite every slot
    matrix.write(np.arange(70), bundles[order], order)
    matrix.write(np.array([3, 40]), bundles[order[[40, 3]]], order[[40, 3]])  # a delete's move: rows swap slots
    matrix.write(np.array([3, 40]), bundles[order[[3, 40]]], order[[3, 40]])
    h = torch.randn(3, 64)
    n = 50
    ref = reference_ffn(layout, bundles, scales, order[:n], h)
    assert relative_error(matrix.ffn(h, n), ref) < 2 * BF16_PRODUCT_RTOL
    mask = torch.rand(3, n) > 0.5
    from flashllm.workers.models.ffn import BundleColumns, masked_ffn_from_rows
    from flashllm.workers.store_reader import bundle_rows_as_float as dequantize_bundles
    rows = torch.from_numpy(dequantize_bundles(layout, bundles[order[:n]], scales, order[:n])).double()
    masked_ref = masked_ffn_from_rows(h.double(), rows, BundleColumns.from_layout(layout.part_slices()), mask)
    assert relative_error(matrix.masked_ffn(h, n, mask), masked_ref) < 2 * BF16_PRODUCT_RTOL


@pytest.mark.parametrize("kind", ["q4_1", "q4_0"])
@pytest.mark.parametrize("count", [64, 70, 127])
def test_rows_written_in_order_pack_whole_tiles_with_the_bits_of_rows_written_one_by_one(kind, count):
    """A masked chunk's rows land in slots 0..k-1: the whole tiles among them are packed at once and the last
    partial tile's rows scattered, which must give the same bytes (so the same products) as any other order."""
    from flashllm.workers.models.quant_ffn import QuantNeuronMatrix

    layout, bundles, scales = quantized_layout_and_bundles(kind, n_ff=160)
    ids = np.random.default_rng(6).permutation(160)[:count]
    in_order = QuantNeuronMatrix(layout, capacity=count, down_scales=scales)
    in_order.write(np.arange(count), bundles[ids], ids)
    one_by_one = QuantNeuronMatrix(layout, capacity=count, down_scales=scales)
    for slot in np.random.default_rng(7).permutation(count):
        one_by_one.write(np.array([slot]), bundles[ids[[slot]]], ids[[slot]])
    assert torch.equal(in_order.packed, one_by_one.packed)
    assert torch.equal(in_order.scales_zeros, one_by_one.scales_zeros)
    assert torch.equal(in_order.down_values, one_by_one.down_values)


@pytest.mark.parametrize("kind", ["q4_1", "q4_0"])
def test_a_whole_layer_converted_on_two_threads_is_torchs_own_packing_of_its_rows_and_down_blocks(kind):
    """What naive converts every layer of every step: the gate/up tiles (a tile's first row past 0 too, and
    q4_0's 18-byte blocks that no word boundary lines up with), the [d, n] down blocks, and the same bytes
    whether a helper thread writes part of them."""
    from concurrent.futures import ThreadPoolExecutor

    from flashllm.workers.flash_io.kernel_layout import write_q4_tiles
    from flashllm.workers.models.quant_ffn import QuantNeuronMatrix
    from flashllm.workers.models.quant_linear import BLOCK_BYTES, split_blocks

    torch_packing = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    layout, bundles, scales = quantized_layout_and_bundles(kind, n_ff=192, d=128)
    slices = layout.part_byte_slices()
    with ThreadPoolExecutor(1) as helper:
        matrices = [QuantNeuronMatrix(layout, 192, scales, whole_layer=True) for _ in range(2)]
        matrices[0].load_whole_layer(bundles, scales)
        matrices[1].load_whole_layer(bundles, scales, helper=helper)
    gate = QuantizedBlocks(kind, torch.from_numpy(np.ascontiguousarray(bundles[:, slices["gate"]])), (192, 128))
    up = QuantizedBlocks(kind, torch.from_numpy(np.ascontiguousarray(bundles[:, slices["up"]])), (192, 128))
    rows_q = torch.cat((split_blocks(gate)[2], split_blocks(up)[2]))  # (384, 128) gate rows, then up rows
    columns = torch.from_numpy(np.ascontiguousarray(bundles[:, slices["down"]]))  # (192, 64): rows 2i | 2i + 1
    down_q = torch.stack((columns & 15, columns >> 4), dim=-1).reshape(192, 128).T  # (d, n_ff)
    for matrix in matrices:
        assert torch.equal(matrix.packed, torch_packing(rows_q.int(), 1))
        assert torch.equal(matrix.down_packed, torch_packing(down_q.contiguous().int(), 1))
    assert torch.equal(matrices[0].scales_zeros, matrices[1].scales_zeros)
    # rows from a later tile's start leave the tiles before them alone
    packed = torch.full((256, 64), 0xAB, dtype=torch.uint8)
    write_q4_tiles(packed.numpy(), 64, bundles, slices["gate"].start, BLOCK_BYTES[kind], 128)
    assert bool((packed[:64] == 0xAB).all())
    assert torch.equal(packed[64:], torch_packing(split_blocks(gate)[2].int(), 1))
    with pytest.raises(ValueError, match="not whole 64-row tiles"):
        write_q4_tiles(packed.numpy(), 32, bundles, slices["gate"].start, BLOCK_BYTES[kind], 128)


@pytest.mark.parametrize("kind", ["q4_1", "q4_0"])
def test_rows_from_neuron_0_hold_down_as_gguf_blocks_and_multiply_like_the_dequantized_rows(kind):
    """A whole layer (dense, naive) or its first chunk keeps down as the int4 [d, n] blocks; other ranges
    as float16 rows; all three multiply like the dequantized weights."""
    from flashllm.workers.models.quant_ffn import quant_rows_of

    layout, bundles, scales = quantized_layout_and_bundles(kind, n_ff=128)
    h = torch.randn(3, 64)
    for ids, as_blocks in ((np.arange(128), True), (np.arange(64), True), (np.arange(32, 96), False)):
        rows = quant_rows_of(layout, bundles[ids], scales, ids)
        assert rows.matrix.down_as_blocks == as_blocks
        assert relative_error(rows.matrix.ffn(h, len(ids)), reference_ffn(layout, bundles, scales, ids, h)) < \
            2 * BF16_PRODUCT_RTOL


@pytest.mark.parametrize("kind,capacity", [("q4_1", 70), ("q4_0", 64), ("q8_0", 1)])
def test_neuron_matrix_bytes_known_before_making_one_are_its_tensors_bytes(kind, capacity):
    from flashllm.workers.models.quant_ffn import QuantNeuronMatrix

    layout, _, scales = quantized_layout_and_bundles(kind)
    assert QuantNeuronMatrix.bytes_for(layout, capacity) == QuantNeuronMatrix(layout, capacity, scales).nbytes
    assert QuantNeuronMatrix.bytes_for(layout, capacity, whole_layer=True) == \
        QuantNeuronMatrix(layout, capacity, scales, whole_layer=True).nbytes


@pytest.mark.parametrize("kind,rows", [("q4_1", 100), ("q4_0", 64), ("q8_0", 50)])
def test_resident_matrix_bytes_known_before_holding_it_are_its_tensors_bytes(kind, rows):
    from flashllm.workers.models.quant_linear import held_matrix_bytes

    blocks = blocks_of(kind, np.random.default_rng(6).normal(0, 0.05, (rows, 64)).astype(np.float32))
    assert held_matrix_bytes(kind, (rows, 64)) == hold_quantized(blocks, torch.float32, "cpu").nbytes


def test_a_4bit_sketch_of_q8_0_rows_fits_them_closer_than_their_range_and_multiplies_as_its_rows():
    """A q8_0 head held at 4 bits (--head-precision 4bit): built chunk by chunk, closer to the rows than
    rounding each group over its range, its reported error the true largest one, its product the product of the
    rows it holds."""
    from flashllm.workers.models.quant_linear import SKETCH_GROUP_WEIGHTS, SKETCH_KIND, held_matrix_bytes

    rng = np.random.default_rng(11)
    w = rng.normal(0, 0.05, (130, 128)).astype(np.float32)  # 130 rows: a ragged last tile of the int4 layout
    w[3, :SKETCH_GROUP_WEIGHTS] = 0.02  # a constant group (no range: held exactly)
    w[5, 7] = 0.9  # an outlier that stretches its group's range
    blocks = blocks_of("q8_0", w)
    stored = dequantize(blocks)  # (130, 128) the rows as stored
    chunks = [(0, blocks.raw[:64]), (64, blocks.raw[64:])]
    sketch = Int4Matrix.fitted_from_chunks("q8_0", (130, 128), chunks)
    whole = Int4Matrix.fitted_from_chunks("q8_0", (130, 128), [(0, blocks.raw)])
    assert torch.equal(sketch.packed, whole.packed) and torch.equal(sketch.scales_zeros, whole.scales_zeros)
    assert sketch.nbytes == held_matrix_bytes(SKETCH_KIND, (130, 128)) < held_matrix_bytes("q8_0", (130, 128))
    rows = sketch.rows(torch.arange(130), torch.float32)  # (130, 128)
    error = (rows - stored).abs()
    assert float(error.max()) == pytest.approx(sketch.fit_max_abs_error, rel=1e-6)
    assert float(error[3, :SKETCH_GROUP_WEIGHTS].max()) < 1e-4
    groups = stored.reshape(130, -1, SKETCH_GROUP_WEIGHTS)  # (130, G, g) each group rounded over its range
    low, step = groups.amin(-1, keepdim=True), (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    by_range = low + torch.round((groups - low) / step.clamp_min(1e-12)) * step  # (130, G, g)
    assert float(error.square().mean()) < 0.97 * float((by_range - groups).square().mean())
    x = torch.from_numpy(rng.normal(0, 1, (3, 128)).astype(np.float32))
    assert relative_error(sketch.matmul(x), x.double() @ rows.double().T) < BF16_PRODUCT_RTOL


# ---- a quantized store, end to end --------------------------------------------------------------

@pytest.fixture(scope="module")
def quantized_tiny_store(tiny_models, tmp_path_factory):
    from flashllm.runtime.tools.convert.store_writer import convert

    out = str(tmp_path_factory.mktemp("quant") / "llama-q4_0")
    convert(tiny_models("llama"), out, dtype="q4_0", progress=False)
    return out


def held_nbytes(value) -> int:
    return value.nbytes


def test_the_memory_plan_counts_quantized_weights_and_caches_as_held(quantized_tiny_store):
    from flashllm.runtime.core.engine import Engine
    from flashllm.workers.memory_plan import cache_bytes_of, naive_minimum_bytes, plan_for_store
    from flashllm.workers.flash_io.kernel_rows import kernel_rows_for
    from flashllm.workers.models.quant_ffn import QuantNeuronMatrix
    from flashllm.workers.prefetch import Prefetcher
    from flashllm.workers.sparse_ffn import CacheView
    from flashllm.workers.store_reader import load_down_group_scales, open_store

    manifest = open_store(quantized_tiny_store)
    plan = plan_for_store(quantized_tiny_store, manifest, 2**40, "dense", 4, 0)
    with Engine(quantized_tiny_store, mode="dense", max_batch=1) as engine:
        model, ffn = engine.executor.model, engine.executor.ffn
        held = {name: held_nbytes(value) for name, value in model.w.items()}
        assert plan.resident_bytes == sum(held.values())
        # the store's blocks, not float copies: attention and embeddings under a float32 copy's third
        float_bytes = sum(4 * info.shape[0] * info.shape[1] for info in manifest.resident_quantized.values())
        # less the row reads' staging, a fixed 128 KiB that this tiny model's matrices do not outweigh
        quantized_held = sum(held[name] - (value.stored_rows.staging_nbytes if hasattr(value, "stored_rows") else 0)
                             for name, value in model.w.items() if not isinstance(value, torch.Tensor))
        assert quantized_held < float_bytes / 3
        tables = load_down_group_scales(quantized_tiny_store, manifest)
        # 4-bit down: a held layer keeps its down blocks with their own scales, and neither form of its table
        assert QuantNeuronMatrix.holds_own_down_scales(manifest.ffn)
        assert all(rows.matrix.down_table is None and rows.matrix.down_kernel_scales is None for rows in ffn.layers)
        assert plan.cache_bytes == sum(rows.matrix.nbytes for rows in ffn.layers)
    # naive holding one layer of two: that layer's matrix, and the streamed layer's table as stored (a decode
    # step multiplies its bundles as read; nothing else of it is kept); the two matrices it streams through are
    # staging
    minimum = naive_minimum_bytes(manifest, plan.resident_bytes, 4, "cpu")
    one_held = plan_for_store(quantized_tiny_store, manifest, minimum + plan.cache_bytes // 2, "naive", 4, 0)
    held_layers = [layer for layer, rows in enumerate(one_held.capacity_rows) if rows]
    assert len(held_layers) == 1
    with Engine(quantized_tiny_store, mode="naive", max_batch=1, memory_budget_bytes=one_held.budget_bytes) as engine:
        ffn = engine.executor.ffn
        assert sorted(ffn._held) == held_layers and ffn.down_scales is None and not ffn._down_kernel_scales
        kept = sum(rows.matrix.nbytes for rows in ffn._held.values()) + \
            sum(t.nbytes for t in ffn._streamed_tables.values())
        assert list(ffn._streamed_tables) == [1 - held_layers[0]]
        assert engine.memory_plan.cache_bytes == kept
    capacity_rows = [70, 100]
    prefetcher = Prefetcher(quantized_tiny_store, manifest, capacity_rows, window_tokens=4,
                            kernel_rows=kernel_rows_for(manifest.ffn, capacity_rows))
    try:
        for layer, cache in enumerate(prefetcher.caches):  # a miss of every neuron: the largest insert there is
            cache.insert(np.arange(capacity_rows[layer]), prefetcher._filler(layer))
        view = CacheView(prefetcher.caches, torch.float32, "cpu", manifest.ffn, tables)
        # each neuron held once, as the kernels take it (no bundles as read beside it, no copy on compute's side)
        assert all(cache.rows is None for cache in prefetcher.caches) and view.held_bytes == 0
        actual = sum(cache.kernel_rows.nbytes for cache in prefetcher.caches) + sum(t.nbytes for t in tables) + \
            prefetcher._arrival_rows.nbytes
        assert cache_bytes_of(manifest.ffn, capacity_rows, 1, "cpu") == actual
    finally:
        prefetcher.close()


def test_dense_and_naive_decode_a_quantized_store_alike_one_sequence_or_a_batch_in_either_order(quantized_tiny_store):
    """Naive multiplies a decode step's layers straight from the bundles as read (flash_io/bundle_products, float32
    activations) and converts them for a prompt or a batch of more than DIRECT_MAX_TOKENS sequences (the int4
    kernels, bfloat16 activations): the same tokens as dense's kernels either way, and logits within the
    kernels' bfloat16 rounding, also when one kind of step follows the other in its pipeline."""
    from flashllm.runtime.core.engine import Engine
    from flashllm.runtime.core.sampling import SamplingParams
    from flashllm.workers.flash_io.bundle_products import DIRECT_MAX_TOKENS

    prompts = [list(range(5 + i, 17 + i)) for i in range(DIRECT_MAX_TOKENS + 1)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    tokens, logits = {}, {}
    for mode in ("dense", "naive"):
        with Engine(quantized_tiny_store, mode=mode, max_batch=len(prompts)) as engine:
            captured = []
            engine.logits_hook = lambda rid, row: captured.append(row.clone())
            one = engine.generate(prompts[:1], params)[0].tokens
            batch = [result.tokens for result in engine.generate(prompts, params)]
            again = engine.generate(prompts[:1], params)[0].tokens
            tokens[mode], logits[mode] = (one, batch, again), torch.stack(captured)
    assert tokens["dense"] == tokens["naive"]
    assert tokens["naive"][0] == tokens["naive"][1][0] == tokens["naive"][2]
    largest = logits["dense"].abs().max()
    assert torch.allclose(logits["dense"], logits["naive"], rtol=0, atol=0.02 * largest)


@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "q8_0"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_a_layer_multiplied_from_its_bundles_as_read_is_its_dequantized_rows_product_in_float32(kind, tokens):
    """What a naive decode step computes for a streamed layer: bundles as flash gave them (padded to the store's
    stride), on one thread or split in halves over two, against the float64 product of the dequantized rows;
    the int4 kernels, fed bfloat16, are several times further off."""
    from concurrent.futures import ThreadPoolExecutor
    from dataclasses import replace

    from flashllm.workers.flash_io.bundle_products import RawBundleRows, direct_products_apply
    from flashllm.workers.models.quant_ffn import QuantNeuronMatrix

    layout, bundles, scales = quantized_layout_and_bundles(kind, n_ff=96)  # three groups: halves of 32 and 64
    stored = np.full((96, bundles.shape[1] + 40), 0xAB, np.uint8)  # padding after the parts, never read
    stored[:, :bundles.shape[1]] = bundles
    stored_layout = replace(layout, bundle_bytes=stored.shape[1])
    assert direct_products_apply(stored_layout)
    h = torch.randn(tokens, 64)
    ref = reference_ffn(layout, bundles, scales, np.arange(96), h)
    direct_error = relative_error(torch.from_numpy(RawBundleRows(stored_layout, stored, scales).ffn(h.numpy())), ref)
    assert direct_error < 1e-5
    with ThreadPoolExecutor(1) as helper:
        halves = RawBundleRows(stored_layout, stored, scales, helper).ffn(h.numpy())  # (tokens, d)
    assert relative_error(torch.from_numpy(halves), ref) < 1e-5
    kernels = QuantNeuronMatrix(layout, 96, scales, whole_layer=True)
    kernels.load_whole_layer(bundles, scales)
    assert relative_error(kernels.ffn(h, 96), ref) > 5 * direct_error


@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "q8_0"])
def test_a_decode_reads_neurons_summed_from_their_bundles_give_a_token_the_same_bits_beside_others(kind):
    """What a decode step computes for a layer without a neuron cache: any neurons' bundles as read, in chunks in id
    order (a chunk may end inside a group of 32, whose down scales they share), each token over the neurons it
    keeps. A token's sums are the bits it gets alone, whatever its neighbours add; a whole layer's are
    RawBundleRows' bits; and they are the float64 product of the dequantized rows to float32 rounding."""
    from flashllm.workers.flash_io.bundle_products import DirectSums, NeuronBundleRows, RawBundleRows

    layout, bundles, scales = quantized_layout_and_bundles(kind, n_ff=96)
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    rng = np.random.default_rng(6)
    own = [np.sort(rng.choice(96, size, replace=False)) for size in (20, 33, 50)]  # each token's neurons

    def summed(tokens: list[int], cuts: list[int]) -> np.ndarray:
        ids = np.unique(np.concatenate([own[t] for t in tokens]))  # the read: the tokens' union
        keep = np.stack([np.isin(ids, own[t]) for t in tokens])  # (N, k)
        sums = DirectSums(h[tokens].numpy())
        for start, stop in zip([0] + cuts, cuts + [len(ids)]):
            sums.add(NeuronBundleRows(layout, bundles[ids[start:stop]], scales, ids[start:stop]), keep[:, start:stop])
        return sums.result()  # (N, d)

    alone = [summed([t], []) for t in range(3)]
    for cuts in ([], [7], [5, 6, 40]):  # one chunk; a group split; a one-row chunk and more splits
        together = summed([0, 1, 2], cuts)
        for t in range(3):
            assert np.array_equal(together[t], alone[t][0])
    for t in range(3):
        reference = reference_ffn(layout, bundles, scales, own[t], h[t:t + 1])
        assert relative_error(torch.from_numpy(alone[t]), reference) < 1e-5
    whole = DirectSums(h.numpy())
    whole.add(NeuronBundleRows(layout, bundles, scales, np.arange(96)), np.ones((3, 96), bool))
    assert np.array_equal(whole.result(), RawBundleRows(layout, bundles, scales).ffn(h.numpy()))


def test_only_gated_quantized_layouts_are_multiplied_from_their_bundles():
    from dataclasses import replace

    from flashllm.workers.flash_io.bundle_products import direct_products_apply

    layout, _, _ = quantized_layout_and_bundles("q4_0")
    assert direct_products_apply(layout)
    parts = layout.bundle_parts
    assert not direct_products_apply(replace(layout, bundle_parts=[parts[1], parts[2]]))  # ReLU (OPT): no gate
    assert not direct_products_apply(replace(layout, bundle_parts=[parts[0], ("up", 64, "q8_0"), parts[2]]))
    assert not direct_products_apply(replace(layout, dtype="float16", bundle_parts=[
        ("gate", 64, "float16"), ("up", 64, "float16"), ("down", 64, "float16")]))


@pytest.fixture(scope="module")
def calibrated_quantized_store(quantized_tiny_store, tmp_path_factory):
    """The quantized tiny store, calibrated, and a budget 20 rows a layer above its minimum (the window must
    evict)."""
    import shutil

    from flashllm.runtime.tools.calibrate import calibrate
    from flashllm.workers.memory_plan import plan_for_store
    from flashllm.workers.store_reader import open_store
    from tests.conftest import calibration_text

    store = str(tmp_path_factory.mktemp("quant") / "calibrated")
    shutil.copytree(quantized_tiny_store, store)
    calibrate(store, calibration_text(), max_tokens=800, progress=False, log=lambda *_: None)
    roomy = plan_for_store(store, open_store(store), 2**40, "sparse", 4, 0, keep_fraction=0.25)
    return store, roomy.budget_for_spare_rows(20 * len(roomy.capacity_rows))


def test_sparse_decodes_a_quantized_store_with_the_same_tokens_in_both_runtimes(calibrated_quantized_store):
    """Caches of quantized bundles held once in the kernels' layouts, written by each runtime's prefetcher, at
    a budget that makes the window evict (and arrivals fill the slots that left)."""
    from flashllm.runtime.core.engine import Engine
    from flashllm.runtime.core.sampling import SamplingParams

    store, budget = calibrated_quantized_store
    prompt = list(range(5, 17))
    tokens = {}
    for runtime in ("inproc", "workers"):
        with Engine(store, mode="sparse", max_batch=1, runtime=runtime,
                    ffn_options={"memory_budget_bytes": budget, "keep_fraction": 0.25}) as engine:
            result = engine.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))[0]
            tokens[runtime] = result.tokens
            assert sum(s["neurons_read"] for s in result.token_stats) > 0  # it read neurons, from the cache's misses
    assert tokens["inproc"] == tokens["workers"]


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["inproc", "workers"])
def test_a_quantized_sparse_run_stays_within_its_memory_bound_with_the_compiled_loops(calibrated_quantized_store,
                                                                                      runtime):
    from flashllm.runtime.tools.memory_cgroup import CgroupUnavailable, measure_baselines, measure_generate

    store, budget = calibrated_quantized_store
    try:
        baselines = measure_baselines(compiled_loops=True)
    except CgroupUnavailable as exc:
        pytest.skip(f"no writable memory cgroup: {exc}")
    assert baselines.compiled_loops_bytes > 0  # loading them costs memory, and the bound counts it
    result = measure_generate(store, "sparse", runtime, memory_bytes=budget, max_tokens=6, baselines=baselines,
                              extra_args=["--keep-fraction", "0.25"])
    assert baselines.torch_process_bytes < result["peak_bytes"] <= result["bound_bytes"], result


@pytest.mark.parametrize("block_kind", ["q4_1", "q4_0", "q8_0"])
def test_down_sums_add_the_format_references_columns_in_the_order_given(block_kind):
    """add_down_sums decodes each value as quant_format's reference does, in float32, and adds the neurons one
    after another in the order given, skipping holes (id -1): the same bits as that loop in numpy."""
    from flashllm.protocol import quant_format as qf
    from flashllm.workers.flash_io.kernel_layout import add_down_sums

    rng = np.random.default_rng(9)
    down = rng.normal(0, 0.05, (64, 96)).astype(np.float32)  # (d, n_ff)
    values, table = qf.quantize_down_columns(block_kind, down)  # (n_ff, bytes), (d, n_ff/32, c)
    slot_ids = np.array([70, 5, -1, 31, 0, 95, 32])  # the neuron at each slot; slot 2 is a hole
    slot_values = values[np.maximum(slot_ids, 0)]
    slot_values[2] = 0xFF  # a hole's bytes are whatever its last neuron left
    slots = np.array([4, 1, 3, 2, 6, 5, 0])  # the order to add them in
    weights = rng.normal(0, 1, len(slots)).astype(np.float32)
    column_kind = qf.GROUPED_COLUMN_KINDS[block_kind]
    expected = np.zeros(64, np.float32)
    for slot, weight in zip(slots, weights):
        if slot_ids[slot] >= 0:
            column = qf.dequantize_grouped_columns(column_kind, values[slot_ids[slot]][None], table,
                                                   slot_ids[slot:slot + 1])[0]  # (d,) float32
            expected += weight * column
    out = np.zeros(64, np.float32)
    add_down_sums(out, weights, slots, slot_values, slot_ids, np.ascontiguousarray(table.transpose(1, 2, 0)),
                  block_kind)
    assert np.array_equal(out, expected)
    with pytest.raises(ValueError, match="not q4_0 columns"):
        add_down_sums(out, weights, slots, np.zeros((7, 64), np.uint8), slot_ids, table.transpose(1, 2, 0), "q4_0")
    with pytest.raises(ValueError, match="not group-major"):  # the table as stored, (d, n_ff/32, c)
        add_down_sums(out, weights, slots, slot_values, slot_ids, table, block_kind)


@pytest.mark.parametrize("kind", ["q4_1", "q4_0", "q8_0"])
def test_a_cache_of_kernel_rows_holds_what_torchs_conversion_gives_whatever_the_order_of_arrivals(kind):
    from flashllm.workers.flash_io.kernel_rows import KernelRows
    from flashllm.workers.models.quant_ffn import QuantNeuronMatrix

    layout, bundles, scales = quantized_layout_and_bundles(kind)
    rows = KernelRows(layout, capacity=70, num_neurons=96)
    order = np.random.default_rng(7).permutation(96)
    rows.arrive(order[:40], bundles[order[:40]])
    rows.depart(order[5:25])  # 20 holes among the first 40 slots
    rows.arrive(order[40:70], bundles[order[40:70]])  # the holes first, lowest first, then new slots
    held = rows.held_ids()  # (used,)
    assert rows.used == 50 and np.array_equal(np.sort(held), np.sort(order[np.r_[0:5, 25:70]]))
    with pytest.raises(ValueError, match="already holds a slot"):
        rows.arrive(order[:1], bundles[order[:1]])
    occupied = np.flatnonzero(held >= 0)
    expected = QuantNeuronMatrix(layout, 70, scales)
    expected.write(occupied, bundles[held[occupied]], held[occupied])
    matrix = QuantNeuronMatrix.over_kernel_rows(layout, rows.arrays, scales)
    assert torch.equal(matrix.slot_neuron_ids[: rows.used], torch.from_numpy(held))
    assert torch.equal(matrix.down_values[occupied], expected.down_values[occupied])  # the columns as stored
    if kind != "q8_0":  # the int4 tiles and (scale, zero) pairs, bit for bit
        assert torch.equal(matrix.scales_zeros, expected.scales_zeros)
    h = torch.randn(3, 64)
    assert torch.equal(matrix.ffn(h, rows.used), expected.ffn(h, rows.used))  # holes add exactly nothing
    ref = reference_ffn(layout, bundles, scales, held[occupied], h)
    assert relative_error(matrix.ffn(h, rows.used), ref) < 2 * BF16_PRODUCT_RTOL


def test_halves_widen_as_numpy_casts_them():
    from flashllm.workers.flash_io.kernel_layout import half_bits_to_float

    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = halves[np.isfinite(halves.view(np.float16))]
    widened = finite.view(np.float16).astype(np.float32)
    assert np.array_equal(half_bits_to_float(finite).view(np.uint32), widened.view(np.uint32))

