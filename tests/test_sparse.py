"""Sparse FFN from flash: calibrate, predictors, window cache, memory plan (tiny models).

The real-model figures (perplexity, bytes, speed) live in `flashllm bench`.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from flashllm.runtime.tools.calibrate import calibrate
from tests.conftest import calibration_text, tight_budget
from flashllm.runtime.core.engine import Engine
from flashllm.workers.memory_plan import MemoryPlanError
from flashllm.runtime.core.sampling import SamplingParams
from flashllm.workers.executor import default_device
from flashllm.workers.flash_io.bundle_reader import BundleReader
from flashllm.workers.models.ffn import neuron_activations
from flashllm.workers.store_reader import verify_store

PROMPTS = [[0, 17, 42, 99, 5], [0, 200, 3, 3, 8, 150, 77, 61, 12]]


def _greedy(store: str, mode: str, runtime: str = "inproc", **ffn_options):
    captured: dict[str, list] = {}
    with Engine(store, mode=mode, max_batch=len(PROMPTS), ffn_options=ffn_options, runtime=runtime) as engine:
        engine.logits_hook = lambda rid, logits: captured.setdefault(rid, []).append(logits.clone())
        results = engine.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
        stats = list(engine.token_stats)
    return results, [torch.stack(captured[f"req-{i}"]) for i in range(len(PROMPTS))], stats


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_sparse_keeping_every_neuron_equals_dense(kind, calibrated_stores):
    store = calibrated_stores(kind)
    dense, dense_logits, _ = _greedy(store, "dense")
    sparse, sparse_logits, stats = _greedy(store, "sparse", keep_fraction=1.0)
    assert [r.tokens for r in sparse] == [r.tokens for r in dense]
    for a, b in zip(sparse_logits, dense_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(s["neurons_computed"] > 0 for s in stats)


def test_calibrate_records_predictors_and_verify_checks_them(calibrated_stores):
    from flashllm.protocol.store_format import read_manifest

    store = calibrated_stores("llama")
    manifest = read_manifest(store)
    info = manifest.sparsity
    assert info is not None and len(info.thresholds) == 2
    # SwiGLU defaults to the 4-bit gate/up sketch: one per layer, the lookahead holding the same matrices
    assert info.predictor == "sketch" and info.rank == manifest.arch.hidden_size
    assert read_manifest(calibrated_stores("opt")).sparsity.predictor == "classifier"
    from safetensors import safe_open

    from flashllm.workers.predictor import SparsityPredictor

    with safe_open(os.path.join(store, info.file), "pt") as f:
        names = set(f.keys())
    assert {"layers.1.sketch.codes", "layers.1.lookahead.input_scale"} <= names
    assert "layers.0.lookahead.input_scale" not in names and not any(".w1" in name for name in names)
    predictor = SparsityPredictor(store, manifest)
    assert predictor.predictors[("lookahead", 1)].weight is predictor.predictors[("same", 1)].weight
    assert all(t > 0 for t in info.thresholds)  # SwiGLU: a magnitude threshold, not relu's exact zero
    assert "sparsity.safetensors: ok" in verify_store(store)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_full_rank_regression_predictor_ranks_neurons_exactly(kind, tiny_stores, tmp_path):
    """At rank d + 1 the least-squares map is the layer's own gate/up product: on fresh inputs the same-layer
    predictor's top half is the true top half by contribution (ReLU: by pre-activation); at rank 2 it is not."""
    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.ffn_providers import DenseFfn
    from flashllm.workers.predictor import SparsityPredictor

    store = str(tmp_path / kind)
    shutil.copytree(tiny_stores(kind), store)
    manifest = read_manifest(store)
    dense = DenseFfn(store, manifest, torch.float32, "cpu")
    x = torch.randn(32, manifest.arch.hidden_size, generator=torch.Generator().manual_seed(0))  # (N, d)
    keep = manifest.arch.intermediate_size // 2

    def top_half_overlap(rank: int) -> float:
        calibrate(store, calibration_text(), max_tokens=800, rank=rank, predictor_type="regression",
                  progress=False, log=lambda *_: None)
        predictor = SparsityPredictor(store, read_manifest(store))
        # the lookahead maps into the same-layer predictor's output directions: stored and held once
        assert predictor.predictors[("lookahead", 1)].w2 is predictor.predictors[("same", 1)].w2
        overlaps = []
        for layer, rows in enumerate(dense.layers):
            cols = dense.cols
            truth = (neuron_activations(x, rows, cols).abs() if cols.gated
                     else x @ rows[:, cols.up].T + rows[:, cols.up_bias].T)  # (N, n_ff)
            scores = predictor.predictors[("same", layer)].scores(x)  # (N, n_ff)
            true_top = torch.zeros_like(truth, dtype=torch.bool).scatter_(1, truth.topk(keep).indices, True)
            predicted_top = torch.zeros_like(true_top).scatter_(1, scores.topk(keep).indices, True)
            overlaps.append((true_top & predicted_top).sum().item() / true_top.sum().item())
        return min(overlaps)

    full, low = top_half_overlap(manifest.arch.hidden_size + 1), top_half_overlap(2)
    assert full > 0.95  # measured 0.9996 (llama), 0.966 (opt): float16 predictor weights swap near-ties
    assert low < 0.85  # measured 0.49, 0.58



@pytest.mark.parametrize("int4_kernel", [True, False], ids=["int4-kernel", "float16-fallback"])
def test_sketch_codes_round_trip_and_the_held_form_multiplies_what_they_stand_for(int4_kernel, monkeypatch):
    """Each weight comes back within half a quantization step; the held form (the CPU int4 kernel's packing,
    output rows padded to its multiple of 16, or float16 where torch lacks the kernel) multiplies like the
    dequantized matrix, and the memory plan's count is its size."""
    from flashllm.workers import predictor as predictor_module
    from flashllm.workers.predictor import (
        SKETCH_GROUP, SketchPredictor, dequantize_sketch, predictor_held_bytes, quantize_sketch, sketch_tensor_names,
    )

    monkeypatch.setattr(predictor_module, "_INT4_CPU_KERNEL", int4_kernel)

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 3 * SKETCH_GROUP, generator=generator)  # (m, d), m not a multiple of 16
    codes, scales = quantize_sketch(weight)
    assert codes.dtype == torch.uint8 and codes.shape == (40, 3 * SKETCH_GROUP // 2) and scales.shape == (40, 3)
    restored = dequantize_sketch(codes, scales)  # (m, d)
    step = scales.float().repeat_interleave(SKETCH_GROUP, dim=1)  # (m, d)
    assert ((restored - weight).abs() <= step / 2 + 1e-6).all()
    x = torch.randn(5, 3 * SKETCH_GROUP, generator=generator)  # (N, d)
    held = SketchPredictor.hold(codes, scales, gated=False, bias=torch.zeros(40))
    assert (held.scales_and_zeros is not None) == int4_kernel
    torch.testing.assert_close(held.pre_activations(x), x @ restored.T, rtol=0.02, atol=0.05)
    names = sketch_tensor_names(0)
    stored = {names["codes"]: codes, names["scales"]: scales, names["bias"]: torch.zeros(40)}
    assert predictor_held_bytes(stored, "sketch", 1, vector_itemsize=4) == held.held_bytes()
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_sketch(torch.randn(4, 40))


def test_lookahead_input_map_turns_one_layers_norm_into_the_next():
    """Layer l-1's FFN input mapped by (scale, shift) is what layer l's norm makes of the same residual stream."""
    from flashllm.workers.predictor import lookahead_input_map

    generator = torch.Generator().manual_seed(0)
    residual = torch.randn(6, 16, generator=generator) * 3  # (N, d)
    w_prev, b_prev, w, b = (torch.randn(16, generator=generator) for _ in range(4))
    scale, shift = lookahead_input_map(w_prev, b_prev, w, b)
    layer_norm = torch.nn.functional.layer_norm
    torch.testing.assert_close(layer_norm(residual, (16,), w_prev, b_prev) * scale + shift,
                               layer_norm(residual, (16,), w, b), rtol=1e-4, atol=1e-4)
    scale, shift = lookahead_input_map(w_prev, None, w, None)  # RMSNorm: weights only
    rms_norm = torch.nn.functional.rms_norm
    torch.testing.assert_close(rms_norm(residual, (16,), w_prev) * scale + shift, rms_norm(residual, (16,), w),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_sketch_predictor_ranks_neurons_like_the_layer_and_the_plan_counts_its_bytes(kind, tiny_stores, tmp_path):
    """The 4-bit sketch's top half on fresh inputs is nearly the true top half by contribution (ReLU: by
    pre-activation); the memory plan's predictor share is what SparsityPredictor holds."""
    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.memory_plan import plan_for_store
    from flashllm.workers.ffn_providers import DenseFfn
    from flashllm.workers.predictor import SparsityPredictor

    store = str(tmp_path / kind)
    shutil.copytree(tiny_stores(kind), store)
    calibrate(store, calibration_text(), max_tokens=800, predictor_type="sketch", progress=False,
              log=lambda *_: None)
    manifest = read_manifest(store)
    assert manifest.sparsity.predictor == "sketch"
    dense = DenseFfn(store, manifest, torch.float32, "cpu")
    predictor = SparsityPredictor(store, manifest)
    x = torch.randn(64, manifest.arch.hidden_size, generator=torch.Generator().manual_seed(0))  # (N, d)
    keep = manifest.arch.intermediate_size // 2
    cols = dense.cols
    for layer, rows in enumerate(dense.layers):
        truth = (neuron_activations(x, rows, cols).abs() if cols.gated
                 else x @ rows[:, cols.up].T + rows[:, cols.up_bias].T)  # (N, n_ff)
        scores = predictor.predictors[("same", layer)].scores(x)  # (N, n_ff)
        true_top = torch.zeros_like(truth, dtype=torch.bool).scatter_(1, truth.topk(keep).indices, True)
        predicted_top = torch.zeros_like(true_top).scatter_(1, scores.topk(keep).indices, True)
        overlap = (true_top & predicted_top).sum().item() / true_top.sum().item()
        assert overlap > 0.88  # measured 0.93 (llama), 0.97 (opt)
    held = {id(p.weight): p.held_bytes() for p in predictor.predictors.values()}  # shared by same and lookahead
    vectors = sum(t.numel() * 4 for p in predictor.predictors.values()
                  for t in (p.input_scale, p.input_shift) if t is not None)
    plan = plan_for_store(store, manifest, 1 << 40, "sparse", 4, 0)
    assert plan.predictor_bytes == sum(held.values()) + vectors

def test_relu_predictor_recall_on_held_out_tokens(calibrated_stores):
    """A ReLU model's active neurons (exact zeros) are predicted with recall ≥ 0.7 on held-out tokens
    (measured: about 0.75-0.85 for the tiny OPT at rank 64, 4 epochs)."""
    from flashllm.protocol.store_format import read_manifest

    info = read_manifest(calibrated_stores("opt")).sparsity
    assert info.label == "relu>0"
    assert min(info.recall) >= 0.7, info.recall


def test_sparse_reads_only_the_increment_and_less_than_naive(calibrated_stores):
    store = calibrated_stores("opt")
    _, _, naive_stats = _greedy(store, "naive")
    _, _, sparse_stats = _greedy(store, "sparse")
    naive_bytes = np.mean([s["flash_read_bytes"] for s in naive_stats])
    sparse_bytes = [s["flash_read_bytes"] for s in sparse_stats]
    assert np.mean(sparse_bytes) < 0.6 * naive_bytes
    # the window keeps recent neurons: later tokens hit the cache
    hits = sum(s["cache_hits"] for s in sparse_stats[5:])
    predicted = sum(s["neurons_predicted"] for s in sparse_stats[5:])
    assert hits / predicted > 0.5


def test_keep_fraction_on_the_command_line_sets_the_bytes_read(calibrated_stores):
    """`flashllm generate --mode sparse --keep-fraction K`: fewer neurons per token, fewer bytes from flash."""
    reads = {}
    if default_device() != "cpu":  # the first process counts CUDA's lazily loaded kernel files (26 MB, H200)
        _generate_json(calibrated_stores("opt"))
    for keep in ("0.1", "0.5"):
        output = _generate_json(calibrated_stores("opt"), "--keep-fraction", keep)
        assert output["runtime"] == ("workers" if default_device() == "cpu" else "inproc")  # --runtime auto
        reads[keep] = output["flash_read_bytes"]
    assert 0 < reads["0.1"] < reads["0.5"], reads  # both include the prompt's whole-layer reads


def _generate_json(store: str, *flags: str) -> dict:
    """The --json line of `flashllm generate --mode sparse FLAGS` (12 tokens, greedy), run through main(argv)."""
    import json

    from tests.cli_run import run_flashllm

    result = run_flashllm("generate", "--store", store, "--mode", "sparse", "--json", "--max-tokens", "12",
                          "--ignore-eos", *flags, "The history of the city")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[0])


def test_window_and_missing_policy_on_the_command_line(calibrated_stores):
    """--neuron-window K keeps the last K tokens' neurons, so a longer window reads less; --missing-policy
    reaches both runtimes (the workers give the in-process tokens under it)."""
    store = calibrated_stores("llama")
    windows = {k: _generate_json(store, "--neuron-window", k)["flash_read_bytes"] for k in ("1", "8")}
    assert 0 < windows["8"] < windows["1"], windows
    runs = {runtime: _generate_json(store, "--missing-policy", "skip", "--runtime", runtime)
            for runtime in ("inproc", "workers")}
    assert runs["workers"]["runtime"] == "workers"
    assert runs["workers"]["tokens"] == runs["inproc"]["tokens"]


def test_the_skip_policy_runs_only_the_lookahead_after_layer_0(calibrated_stores):
    """Under "skip" a decode token's predicted set per layer is the lookahead's k neurons (layer 0, which has
    no lookahead, its same-layer k): nothing is added late. "read" adds the same-layer check's extras."""
    store = calibrated_stores("llama")
    predicted = {}
    for policy in ("read", "skip"):
        with Engine(store, mode="sparse", max_batch=1, ffn_options={"missing_policy": policy}) as engine:
            engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True))
            keep, layers = engine.executor.ffn.predictor.keep_neurons, engine.arch.num_hidden_layers
            predicted[policy] = [s["neurons_predicted"] for s in engine.token_stats]
    assert predicted["skip"] == [keep * layers] * len(predicted["skip"])
    assert all(p >= keep * layers for p in predicted["read"]) and sum(predicted["read"]) > sum(predicted["skip"])


def test_the_step_planner_decides_each_layers_sets_path_and_hand_over(calibrated_stores):
    """workers/sparse_policy.py, the one place both runtimes take their per-layer decisions from: layer 0
    uses its same-layer set; layer 1 the lookahead set predicted from layer 0's input, plus (policy "read")
    the same-layer check's set late, or (policy "skip") nothing late and a hand-over at the lookahead; a set
    that does not fit the cache, and every layer of a multi-token step, reads the layer whole with each
    token's own neurons (same ∪ lookahead ∪ hot)."""
    store = calibrated_stores("llama")
    with torch.inference_mode():  # as both runtimes plan
        _check_the_planner(store)


def _check_the_planner(store: str) -> None:
    from flashllm.workers.predictor import SparsityPredictor
    from flashllm.workers.sparse_policy import CachedLayer, MaskedLayer, SparseStepPlanner
    from flashllm.workers.store_reader import open_store

    manifest = open_store(store)
    predictor = SparsityPredictor(store, manifest, keep_fraction=0.25)
    n, k = predictor.num_neurons, predictor.keep_neurons
    h0, h1 = torch.randn(2, 1, manifest.arch.hidden_size, generator=torch.Generator().manual_seed(0))  # (1, d) each
    no_pins = [np.zeros(n, dtype=bool)] * predictor.num_layers

    decisions = {}
    for policy in ("read", "skip"):
        planner = SparseStepPlanner(predictor, [n] * predictor.num_layers, no_pins, policy)
        planner.begin_step(1)
        decisions[policy] = planner.plan_layer(0, h0), planner.plan_layer(1, h1)
    for policy, (layer0, layer1) in decisions.items():
        assert type(layer0) is CachedLayer and type(layer1) is CachedLayer
        assert np.array_equal(layer0.first, predictor.predict("same", 0, h0)) and not layer0.late.size
        assert layer0.lookahead.layer == 1 and layer0.lookahead.fits
        assert np.array_equal(layer1.first, predictor.predict("lookahead", 1, h0)) and layer1.first_prepared
        assert layer1.lookahead is None  # the last layer
    read, skip = decisions["read"][1], decisions["skip"][1]
    assert np.array_equal(read.late, predictor.predict("same", 1, h1)) and not read.ready_at_lookahead
    assert read.num_predicted > k and np.array_equal(read.predicted, np.union1d(read.first, read.late))
    assert not skip.late.size and skip.ready_at_lookahead and skip.num_predicted == k

    too_small = SparseStepPlanner(predictor, [k - 1] * predictor.num_layers, no_pins, "read")
    too_small.begin_step(1)
    fallback = too_small.plan_layer(0, h0)
    assert type(fallback) is MaskedLayer and fallback.mask.shape == (1, n)
    expected = predictor.predict_mask("same", 0, h0)  # (1, n): no previous layer, no lookahead
    expected[:, predictor.hot_ids[0]] = True
    assert torch.equal(fallback.mask, expected) and fallback.num_predicted == int(expected.sum())

    prompt = torch.cat([h0, h1])  # (2, d): a two-token step
    planner = SparseStepPlanner(predictor, [n] * predictor.num_layers, no_pins, "read")
    planner.begin_step(2)
    assert type(planner.plan_layer(0, prompt)) is MaskedLayer
    layer1 = planner.plan_layer(1, prompt.flip(0))
    expected = predictor.predict_mask("same", 1, prompt.flip(0)) | predictor.predict_mask("lookahead", 1, prompt)
    expected[:, predictor.hot_ids[1]] = True
    assert type(layer1) is MaskedLayer and torch.equal(layer1.mask, expected)
    assert layer1.num_predicted == int(expected.any(0).sum())


def test_the_same_layer_check_takes_rows_from_older_tokens_then_from_the_lookaheads_unconfirmed_picks(calibrated_stores):
    """Policy "read": the same-layer check's set joins the token's lookahead set. Its misses take rows from the
    least recently used neurons it does not need (an older token's first, then the lookahead's picks it did not
    confirm), never from itself or the pinned; only a set that outgrows the cache with the pinned neurons (a
    batch's union) is cut, lowest ids first."""
    from flashllm.workers.prefetch import Prefetcher
    from flashllm.workers.store_reader import open_store

    store = calibrated_stores("llama")
    manifest = open_store(store)
    layers = manifest.arch.num_hidden_layers
    prefetcher = Prefetcher(store, manifest, [25] * layers, window_tokens=2,
                            hot_ids=[np.array([50, 51])] + [np.zeros(0, np.int64)] * (layers - 1))
    try:
        cache = prefetcher.caches[0]
        prefetcher.prepare(0, np.arange(30, 38), new_token=True)  # an older token: 8 + 2 pinned rows
        prefetcher.prepare(0, np.arange(0, 10), new_token=True)  # this token's lookahead set: 20 rows
        update = prefetcher.prepare(0, np.arange(5, 25), new_token=False)  # confirms 5..9, adds 10..24
        assert (update.read_neurons, update.hits, cache.num_rows) == (15, 0, 25)
        cached = set(cache.cached_ids.tolist())
        assert set(range(5, 25)) | {50, 51} <= cached and not cached & set(range(30, 38))
        assert len(cached & set(range(5))) == 3  # 10 rows were needed: the older token's 8, then 2 unconfirmed

        rows, slot_ids = cache.dense_rows()
        assert np.array_equal(rows, prefetcher.reader.read_layer(0)[slot_ids].astype(rows.dtype))

        cache = prefetcher.caches[1]  # nothing pinned
        prefetcher.prepare(1, np.arange(0, 10), new_token=True)
        update = prefetcher.prepare(1, np.arange(10, 40), new_token=False)  # 30 > 25 rows: the lowest 25 ids
        assert update.read_neurons == 25 and set(cache.cached_ids.tolist()) == set(range(10, 35))
    finally:
        prefetcher.close()


def test_reads_started_ahead_are_taken_over_by_their_layers_prepare(calibrated_stores):
    """start_stage puts a layer's lookahead reads on the device while the caller computes; that layer's
    prepare takes them over (each bundle read once), and a read of another layer first drops them."""
    from flashllm.workers.prefetch import Prefetcher
    from flashllm.workers.store_reader import open_store

    store = calibrated_stores("llama")
    manifest = open_store(store)
    bundle_bytes = manifest.ffn.bundle_bytes
    prefetcher = Prefetcher(store, manifest, [40] * manifest.arch.num_hidden_layers, window_tokens=2)
    try:
        prefetcher.start_stage(1, np.arange(0, 20))
        update = prefetcher.prepare(1, np.arange(0, 20), new_token=True)
        assert update.read_neurons == 20 and prefetcher.reader.stats.useful_bytes == 20 * bundle_bytes
        prefetcher.start_stage(1, np.arange(20, 30))
        assert prefetcher.prepare(0, np.arange(0, 10), new_token=True).read_neurons == 10
        assert prefetcher.caches[1].num_rows == 20 and prefetcher.reader.stats.useful_bytes == 40 * bundle_bytes
        for layer in (0, 1):
            rows, slot_ids = prefetcher.caches[layer].dense_rows()
            assert np.array_equal(rows, prefetcher.reader.read_layer(layer)[slot_ids].astype(rows.dtype))
    finally:
        prefetcher.close()


def test_whole_layer_reads_go_chunk_by_chunk_and_a_reader_left_midway_reads_on(calibrated_stores, monkeypatch):
    """The dense-read path reads a layer a chunk at a time (here a quarter of a layer) into the caller's
    buffer: the bytes are the layer's; a caller that stops after the first chunk leaves no read pending."""
    from flashllm.workers.flash_io import bundle_reader
    from flashllm.workers.prefetch import Prefetcher
    from flashllm.workers.store_reader import open_store

    store = calibrated_stores("llama")
    manifest = open_store(store)
    layout = manifest.ffn
    monkeypatch.setattr(bundle_reader, "DENSE_CHUNK_BYTES", layout.layers[0].length_bytes // 4)
    prefetcher = Prefetcher(store, manifest, [40] + [0] * (manifest.arch.num_hidden_layers - 1), window_tokens=2)  # layer 1 uncached
    try:
        whole = prefetcher.reader.read_layer(1).copy()  # (n_ff, E)
        out = np.zeros_like(whole)
        chunks = []
        landed = np.zeros_like(whole)
        for ids, waited_s in prefetcher.read_layer_chunks(1, lambda count: landed[:count]):
            assert waited_s >= 0 and not landed[len(ids):].any()  # one chunk's rows at a time
            out[ids] = landed[: len(ids)]
            chunks.append((int(ids[0]), int(ids[-1]) + 1))
            landed[:] = 0
        assert len(chunks) >= 4 and chunks[0][0] == 0 and chunks[-1][1] == len(whole)
        assert np.array_equal(out, whole)
        slot = np.zeros_like(whole)
        work = prefetcher.read_chunk(1, np.arange(*chunks[1]), slot)
        assert np.array_equal(slot[: work.neurons], whole[chunks[1][0]:chunks[1][1]]) and not slot[work.neurons:].any()

        # a decode step's masked read: only the given neurons, in chunks of as many rows
        wanted = np.arange(3, len(whole), 3)
        got = [(ids, landed[: len(ids)].copy()) for ids, _ in prefetcher.read_layer_chunks(
            1, lambda count: landed[:count], read_ids=wanted)]
        assert len(got) > 1 and np.array_equal(np.concatenate([ids for ids, _ in got]), wanted)
        assert all(np.array_equal(rows, whole[ids]) for ids, rows in got)

        # read ahead for an uncached layer (its lookahead): the spans a cost-merged read covers are kept, and
        # the decode step's read takes its rows from there, reading nothing where they cover its set
        ahead = np.array([2, 5, 9, len(whole) - 1])
        covered = prefetcher.reader.span_ids(1, ahead)
        assert set(ahead) <= set(covered) and np.all(np.diff(covered) > 0) and 3 in covered  # gaps read
        staged = prefetcher.stage(1, ahead)
        assert staged.neurons == len(covered)
        before = prefetcher.reader.stats.read_bytes
        inside = np.array([3, 4, 9])
        got = [(ids, landed[: len(ids)].copy()) for ids, _ in prefetcher.read_layer_chunks(
            1, lambda count: landed[:count], read_ids=inside)]
        assert prefetcher.reader.stats.read_bytes == before  # all from the read-ahead
        assert np.array_equal(got[0][1], whole[inside])
        outside = np.array([4, len(whole) // 2])  # one staged, one read now
        rows = np.zeros((2, whole.shape[1]), whole.dtype)
        work = prefetcher.read_chunk(1, outside, rows, reads_subset=True)
        assert np.array_equal(rows, whole[outside]) and 0 < work.read_bytes < 2 * manifest.ffn.bundle_bytes + 8192

        first_only = prefetcher.read_layer_chunks(0, lambda count: landed[:count])
        next(first_only)  # the second chunk's reads are on the device now
        first_only.close()
        update = prefetcher.prepare(0, np.arange(0, 10), new_token=True)
        rows, slot_ids = prefetcher.caches[0].dense_rows()
        assert update.read_neurons == 10
        assert np.array_equal(rows, prefetcher.reader.read_layer(0)[slot_ids].astype(rows.dtype))
    finally:
        prefetcher.close()


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_prefill_in_chunks_equals_prefill_over_the_whole_layer_and_holds_a_chunk(kind, calibrated_stores, monkeypatch):
    """Prompt prefill takes the dense-read path chunk by chunk (a quarter of a layer here), each token keeping
    half the neurons: the first token's logits equal those of one pass over the whole layer, and the buffers
    it held are a chunk's, not a whole layer's."""
    from flashllm.workers.flash_io import bundle_reader
    from flashllm.workers.store_reader import open_store

    store = calibrated_stores(kind)
    chunk_bytes = open_store(store).ffn.layers[0].length_bytes // 4
    first_logits = {}
    for chunk in (None, chunk_bytes):  # the default chunk holds a whole tiny layer
        if chunk is not None:
            monkeypatch.setattr(bundle_reader, "DENSE_CHUNK_BYTES", chunk)
        with Engine(store, mode="sparse", max_batch=len(PROMPTS), ffn_options={"keep_fraction": 0.5}) as engine:
            captured = first_logits[chunk] = {}
            engine.logits_hook = lambda rid, logits: captured.setdefault(rid, logits.clone())
            engine.generate(PROMPTS, SamplingParams(max_tokens=1, ignore_eos=True))  # prefill only
            ffn = engine.executor.ffn
            assert ffn.prefetcher.reader._layer_buffer.nbytes == 0  # no whole-layer buffer was ever allocated
    assert ffn._chunk_rows.nbytes <= chunk_bytes
    # a GPU sums the parts in float16, so four partial sums round differently from one (seen: 4e-3 apart)
    tolerance = 1e-5 if default_device() == "cpu" else 2e-2
    for rid, logits in first_logits[None].items():
        torch.testing.assert_close(first_logits[chunk_bytes][rid], logits, rtol=tolerance, atol=tolerance)


def test_the_plan_stages_a_round_of_reads_and_two_chunks_and_gives_the_caches_the_rest(calibrated_stores, monkeypatch):
    """The sparse mode stages a read of neurons (at most a layer) and two dense-read chunks (the worker
    runtime's shared-memory slots; in process one as read), not whole layers; the rest goes to the caches."""
    from flashllm.workers.memory_plan import plan_for_store
    from flashllm.workers.flash_io import bundle_reader
    from flashllm.workers.flash_io.bundle_reader import largest_chunk_rows, largest_span_bytes
    from flashllm.workers.store_reader import open_store

    store = calibrated_stores("llama")
    manifest = open_store(store)
    region_bytes = manifest.ffn.layers[0].length_bytes
    monkeypatch.setattr(bundle_reader, "DENSE_CHUNK_BYTES", region_bytes // 4)
    budget = tight_budget(store, 0.25, 40, itemsize=4, cache_itemsize=4)  # as on a CPU: float32
    plan = plan_for_store(store, manifest, budget, "sparse", 4, 0, keep_fraction=0.25, cache_itemsize=4)
    chunk_bytes = largest_chunk_rows(manifest.ffn) * manifest.ffn.bundle_bytes
    assert region_bytes // 5 < chunk_bytes <= region_bytes // 4
    assert plan.staging_bytes == largest_span_bytes(manifest.ffn) + 2 * chunk_bytes  # a tiny layer is one round
    assert region_bytes < plan.staging_bytes <= region_bytes * 3 // 2
    assert sum(plan.capacity_rows) == sum(plan.min_capacity_rows) + 40
    assert "read staging" in plan.describe()


def test_both_runtimes_plan_the_same_caches_and_decode_the_same_tokens_at_a_tight_budget(calibrated_stores):
    """One budget, either runtime: the same neuron caches, so the same evictions and reads, and the same
    greedy tokens (the workers' plan once held two chunks more, so their caches were smaller and the demo
    model's tokens drifted apart)."""
    store = calibrated_stores("llama")
    options = {"keep_fraction": 0.25, "memory_budget_bytes": tight_budget(store, 0.25, 20)}
    runs = {}
    for runtime in ("inproc", "workers"):
        with Engine(store, mode="sparse", max_batch=len(PROMPTS), ffn_options=dict(options),
                    runtime=runtime) as engine:
            results = engine.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))
            runs[runtime] = (engine.memory_plan.capacity_rows, [r.tokens for r in results],
                             sum(s["neurons_read"] for s in engine.token_stats[1:]))
    assert runs["workers"] == runs["inproc"]
    assert runs["inproc"][2] > 0  # decode steps read neurons: the caches were too small to hold them all


def test_memory_budget_too_small_names_the_minimum(calibrated_stores):
    with pytest.raises(MemoryPlanError, match=r"minimum for this store and settings is [0-9.]+ MiB"):
        Engine(calibrated_stores("llama"), mode="sparse", ffn_options={"memory_budget_bytes": 100_000})


def test_memory_budget_bounds_the_neuron_caches(calibrated_stores):
    store = calibrated_stores("llama")
    budget = 2_000_000
    with Engine(store, mode="sparse", max_batch=2, ffn_options={"memory_budget_bytes": budget}) as engine:
        plan = engine.memory_plan
        assert plan.total_bytes <= budget
        caches = engine.executor.ffn.prefetcher.caches
        assert [c.capacity_rows for c in caches] == plan.capacity_rows
        assert sum(c.rows.nbytes for c in caches) == plan.cache_bytes  # the plan counts the rows as held
        for prompt in PROMPTS:  # one at a time: a batch's own sets would not fit such caches together
            engine.generate([prompt], SamplingParams(max_tokens=16, ignore_eos=True))
        assert all(c.num_rows <= c.capacity_rows for c in caches)
        assert sum(c.deleted for c in caches) > 0  # the budget made the window and LRU evict
        # every row the prefetcher put in (reads started before it made room, then evictions) is its neuron's bundle
        with BundleReader(store, engine.manifest.ffn) as reader:
            for layer, cache in enumerate(caches):
                rows, slot_ids = cache.dense_rows()
                expected = reader.read_layer(layer)[slot_ids].astype(rows.dtype)  # (num_rows, E)
                assert np.array_equal(rows, expected), layer


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_a_budget_below_every_layers_cache_leaves_layers_uncached_that_read_each_tokens_set(kind, calibrated_stores,
                                                                                            monkeypatch):
    """Between the minimum (no cache at all) and every layer's smallest cache, the plan gives whole smallest
    caches to as many layers as fit and none to the rest. An uncached layer reads exactly its tokens' sets each
    decode step, and computes them: keeping every neuron, the logits are dense's."""
    from flashllm.workers.flash_io import bundle_reader
    from flashllm.workers.memory_plan import cached_layers_that_fit, plan_for_store
    from flashllm.workers.store_reader import open_store

    store = calibrated_stores(kind)
    manifest = open_store(store)
    n_ff = manifest.arch.intermediate_size
    # chunks of a quarter layer: the read-ahead an uncached layer holds is one set, not the whole tiny layer
    # (which would outweigh both layers' smallest caches, and leave no budget between the two minimums)
    monkeypatch.setattr(bundle_reader, "DENSE_CHUNK_BYTES", round(0.25 * n_ff) * manifest.ffn.bundle_bytes)
    roomy = plan_for_store(store, manifest, None, "sparse", 4, 0, keep_fraction=0.25)
    assert roomy.minimum_bytes < roomy.cached_minimum_bytes
    at_minimum = plan_for_store(store, manifest, roomy.minimum_bytes, "sparse", 4, 0, keep_fraction=0.25)
    assert at_minimum.capacity_rows == [0, 0] and at_minimum.uncached_layers == 2
    # in between, a layer has its smallest cache or none (on two layers, one cache weighs about as much as the
    # read-ahead an uncached layer holds)
    between = [plan_for_store(store, manifest, budget, "sparse", 4, 0, keep_fraction=0.25)
               for budget in range(roomy.minimum_bytes, roomy.cached_minimum_bytes, 1024)]
    assert all(plan.total_bytes <= plan.budget_bytes for plan in between)
    assert {tuple(plan.capacity_rows) for plan in between} <= {(0, 0), (roomy.min_capacity_rows[0], 0)}
    last = between[-1]
    assert last.uncached_layers and f"{last.uncached_layers} of 2 layers have no neuron cache" in last.describe()
    # on a deeper model the caches come one layer at a time, spread over the depth
    held = lambda capacity: 100 + sum(capacity) + (5 if 0 in capacity else 0)  # noqa: E731
    assert cached_layers_that_fit([10] * 6, 105, held) == [0] * 6
    assert cached_layers_that_fit([10] * 6, 125, held) == [10, 0, 0, 10, 0, 0]
    assert cached_layers_that_fit([10] * 6, 159, held) == [10] * 5 + [0]
    assert cached_layers_that_fit([10] * 6, 160, held) == [10] * 6
    with pytest.raises(MemoryPlanError, match="with no neuron cache"):
        plan_for_store(store, manifest, roomy.minimum_bytes - 1, "sparse", 4, 0, keep_fraction=0.25)

    # no cache at all, a quarter of the neurons: each decode token reads and computes its two sets, no more
    results, _, stats = _greedy(store, "sparse", keep_fraction=0.25, capacity_rows=[0, 0])
    keep = round(0.25 * n_ff)
    decode = stats[1:]  # two sequences each step: each layer reads the union of their sets
    assert all(s["neurons_read"] == s["neurons_computed"] == s["neurons_predicted"] for s in decode)
    assert all(keep * 2 <= s["neurons_read"] <= keep * 2 * s["batch"] for s in decode)
    assert all(s["cache_hits"] == 0 for s in decode)
    assert all(len(r.tokens) == 24 for r in results)
    # every neuron kept: an uncached layer's sums are the dense FFN's
    dense, dense_logits, _ = _greedy(store, "dense")
    sparse, sparse_logits, _ = _greedy(store, "sparse", keep_fraction=1.0, capacity_rows=[0, 0])
    assert [r.tokens for r in sparse] == [r.tokens for r in dense]
    for a, b in zip(sparse_logits, dense_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_float16_resident_matrices_halve_the_plan_and_keep_the_answers(calibrated_stores):
    """--resident-dtype float16: the plan counts half the resident bytes (more room for neuron caches) and the
    model's logits stay within float16 rounding of the float32 ones, in prefill and decode."""
    store = calibrated_stores("llama")
    results, plans, logits = {}, {}, {}
    for dtype in ("float32", "float16"):
        captured: dict[str, list] = {}
        with Engine(store, mode="sparse", max_batch=2, resident_dtype=dtype,
                    ffn_options={"memory_budget_bytes": 4_000_000, "keep_fraction": 1.0}) as engine:
            engine.logits_hook = lambda rid, row: captured.setdefault(rid, []).append(row.clone())
            results[dtype] = engine.generate(PROMPTS, SamplingParams(max_tokens=12, ignore_eos=True))
            plans[dtype] = engine.memory_plan
        logits[dtype] = torch.cat([torch.stack(captured[f"req-{i}"]) for i in range(len(PROMPTS))])
    assert plans["float16"].resident_bytes * 2 == plans["float32"].resident_bytes
    assert sum(plans["float16"].capacity_rows) >= sum(plans["float32"].capacity_rows)
    torch.testing.assert_close(logits["float16"], logits["float32"], rtol=0, atol=2e-2 * logits["float32"].abs().max().item())
    assert [r.tokens for r in results["float16"]] == [r.tokens for r in results["float32"]]


def test_sparse_mode_without_calibration_says_what_to_run(tiny_stores):
    from flashllm.protocol.store_format import StoreError

    with pytest.raises(StoreError, match="flashllm calibrate"):
        Engine(tiny_stores("llama"), mode="sparse")


def test_bench_measures_naive_and_sparse_in_turns(calibrated_stores):
    """`flashllm bench` pairs the modes round by round: the speed-up is each round's naive/sparse ratio."""
    from flashllm.runtime.tools.bench import bench_engine_config, paired_speed

    report = paired_speed(calibrated_stores("llama"), {"naive": bench_engine_config("naive"),
                                                "sparse": bench_engine_config("sparse")}, rounds=2, decode_tokens=4)
    per_round = report["ms_per_token_per_round"]
    assert report["baseline"] == "naive" and len(per_round["naive"]) == len(per_round["sparse"]) == 2
    assert all(ms > 0 for ms in per_round["naive"] + per_round["sparse"])
    ratios = report["speedup_over_naive_per_round"]["sparse"]
    assert ratios == pytest.approx([n / s for n, s in zip(per_round["naive"], per_round["sparse"])])
    assert report["speedup_over_naive"]["sparse"] == pytest.approx(sorted(ratios)[0] / 2 + sorted(ratios)[1] / 2)


def test_bench_tradeoff_includes_the_main_setting_beside_the_swept_ones(calibrated_stores):
    """The trade-off table and plot get the main run's keep fraction as one more point, measured once."""
    from flashllm.runtime.tools.bench import run_bench

    report = run_bench(calibrated_stores("llama"), ["dense", "sparse"], None, decode_tokens=4, text=calibration_text(),
                       eval_tokens=24, keep_fractions=[0.75, 0.25], runtimes=["inproc"], read_baseline=False,
                       keep_fraction=0.5)
    rows = report["sparsity_tradeoff"]
    assert [row["keep_fraction"] for row in rows] == [0.25, 0.5, 0.75]
    main = report["modes"]["sparse"]
    assert rows[1]["ms_per_token"] == main["ms_per_token"] and rows[1]["perplexity"] == main["perplexity"]
    assert all(row["perplexity"] > 0 and 0 <= row["top1_agreement_with_dense"] <= 1 for row in rows)


def test_a_half_cache_is_multiplied_as_held_on_the_cpu():
    """A float16 store's cache keeps float16 rows; the CPU widens them a chunk at a time as it multiplies."""
    from flashllm.workers.flash_io.neuron_cache import NeuronCache
    from flashllm.workers.models.ffn import HALF_ROWS_CHUNK, BundleColumns, HalfRows, ffn_from_rows
    from flashllm.workers.sparse_ffn import CacheView

    rows_needed = HALF_ROWS_CHUNK + 40  # more than one chunk
    store = np.random.default_rng(1).standard_normal((rows_needed, 12)).astype(np.float16)  # (n, E) bundles
    cache = NeuronCache(rows_needed, 12, capacity_rows=rows_needed, dtype=np.float16, window_tokens=1)
    cache.insert(np.arange(rows_needed), lambda ids, out: np.copyto(out, store[ids]))
    view = CacheView([cache], torch.float32, "cpu")
    rows = view.rows(0)
    assert isinstance(rows, HalfRows) and view.held_bytes == 0 and cache.rows.dtype == np.float16
    cols = BundleColumns(gated=True, gate=slice(0, 4), up=slice(4, 8), down=slice(8, 12), up_bias=None)
    h = torch.randn(3, 4)
    widened = torch.from_numpy(store[cache.cached_ids].astype(np.float32))
    assert torch.allclose(ffn_from_rows(h, rows, cols), ffn_from_rows(h, widened, cols), rtol=1e-5, atol=1e-5)


def test_cache_mirror_copies_only_the_rows_whose_neuron_changed():
    """Where compute can't use the cache rows in place (GPU, another dtype) it keeps a mirror in sync."""
    from flashllm.workers.flash_io.neuron_cache import NeuronCache
    from flashllm.workers.sparse_ffn import CacheView

    store = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float16)  # (40, 6) bundles
    fill = lambda ids, out: np.copyto(out, store[ids])  # noqa: E731
    caches = [NeuronCache(40, 6, capacity_rows=cap, dtype=np.float16, window_tokens=2) for cap in (10, 16)]
    view = CacheView(caches, torch.float32, "cpu", widen_in_place=False)  # the mirror a GPU keeps, on the CPU
    assert not view.zero_copy

    def mirrored(layer):
        cache = caches[layer]
        rows = view.rows(layer)
        assert rows.dtype == torch.float32 and rows.shape == (cache.num_rows, 6)
        assert torch.equal(rows, torch.from_numpy(store[cache.cached_ids].astype(np.float32)))

    caches[1].insert(np.array([3, 30, 12, 7, 25, 0]), fill)
    mirrored(1)
    assert view.rows_copied == 6
    mirrored(1)
    assert view.rows_copied == 6  # nothing changed, nothing copied
    caches[1].delete(np.array([30, 7]))  # rows 1 and 3 get ids 25 and 0 from the tail
    caches[1].insert(np.array([39]), fill)  # appended at row 4
    mirrored(1)
    assert view.rows_copied == 6 + 3
    caches[0].insert(np.arange(10), fill)  # a full layer
    mirrored(0)
    assert view.rows_copied == 9 + 10


def test_layers_kept_dense_are_pinned_whole_so_an_all_dense_store_decodes_as_the_dense_model(tiny_stores, tmp_path):
    """calibrate --dense-layers: every neuron of those layers is pinned (read once, never predicted away).
    With every layer kept dense, sparse decoding at a low keep fraction gives the dense model's tokens and
    reads nothing from flash after the prompt."""
    from flashllm.protocol.store_format import read_manifest

    store = str(tmp_path / "all_dense")
    shutil.copytree(tiny_stores("llama"), store)
    lines = []
    calibrate(store, calibration_text(), max_tokens=1200, progress=False, log=lines.append, dense_layers=[1, 0])
    info = read_manifest(store).sparsity
    assert info.dense_layers == [0, 1] and len(info.layer_loss_increase) == 2
    assert any("kept dense (every neuron pinned): layers 0, 1" in line for line in lines), lines
    dense, dense_logits, _ = _greedy(store, "dense")
    sparse, sparse_logits, stats = _greedy(store, "sparse", keep_fraction=0.25)
    assert [r.tokens for r in sparse] == [r.tokens for r in dense]
    for a, b in zip(sparse_logits, dense_logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    decode = stats[1:]  # stats[0] is the prompts' prefill
    assert decode and all(s["neurons_read"] == 0 and s["flash_read_bytes"] == 0 for s in decode), decode
    workers, _, worker_stats = _greedy(store, "sparse", runtime="workers", keep_fraction=0.25)
    assert [r.tokens for r in workers] == [r.tokens for r in dense]
    assert all(s["flash_read_bytes"] == 0 for s in worker_stats[1:]), worker_stats  # the prefetch process's


def test_calibrate_reads_each_layer_once_after_the_forward_passes(tiny_stores, tmp_path, monkeypatch):
    """With the FFN held for the forward passes, calibrate reads each layer twice in all: once for that hold,
    once for labels, predictor and sensitivity together (the sensitivity pass once read every layer again)."""
    from flashllm.workers.flash_io import bundle_reader

    store = str(tmp_path / "llama")
    shutil.copytree(tiny_stores("llama"), store)
    reads = []
    read_layer = bundle_reader.BundleReader.read_layer

    def counting_read_layer(self, layer, *args, **kwargs):
        reads.append(layer)
        return read_layer(self, layer, *args, **kwargs)

    monkeypatch.setattr(bundle_reader.BundleReader, "read_layer", counting_read_layer)
    calibrate(store, calibration_text(), max_tokens=800, ffn_in_memory=True, progress=False, log=lambda *_: None)
    assert sorted(reads) == [0, 0, 1, 1]


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_sensitivity_pass_equals_one_forward_per_sparse_layer_and_reads_no_ffn_itself(kind, calibrated_stores,
                                                                                      monkeypatch):
    """calibrate's layer sensitivity carries every one-layer-sparse model through the layers together, on the
    rows handed to it. Each increase equals that of a plain forward pass with only that layer sparse, and the
    pass reads no FFN rows of its own (a model at a time read the whole FFN once per layer)."""
    from flashllm.runtime.tools.calibrate import _LayerSensitivity
    from flashllm.workers.executor import ModelExecutor
    from flashllm.workers.ffn_providers import FfnStats
    from flashllm.workers.interfaces import FfnProvider
    from flashllm.workers.models.ffn import BundleColumns, ffn_from_rows, masked_ffn_from_rows
    from flashllm.workers.predictor import SparsityPredictor, top_k_mask
    from flashllm.workers.store_reader import open_store

    store = calibrated_stores(kind)
    manifest = open_store(store)
    num_layers = manifest.arch.num_hidden_layers
    sparsity = SparsityPredictor(store, manifest, keep_fraction=0.25)
    predictors = [sparsity.predictors[("same", layer)] for layer in range(num_layers)]
    cols = BundleColumns.from_layout(manifest.ffn.part_slices())
    with BundleReader(store, manifest.ffn) as reader:
        layers = [torch.from_numpy(reader.read_layer(layer).astype(np.float32)) for layer in range(num_layers)]
    token_ids = [int(t) for t in np.random.default_rng(0).integers(2, manifest.arch.vocab_size, 120)]

    executor = ModelExecutor(store, manifest, "naive", 1, 128, device="cpu")
    reads = []
    monkeypatch.setattr(BundleReader, "read_layer", lambda self, layer: reads.append(layer))
    sensitivity = _LayerSensitivity(executor, cols, token_ids, sparsity.keep_neurons)
    for layer in range(num_layers):
        sensitivity.advance(layer, layers[layer], predictors[layer])
    increases = sensitivity.increases()
    monkeypatch.undo()
    assert reads == []  # the naive executor only lends its model and KV cache: no rows but those handed over
    executor.close()

    class OnlyOneLayerSparse(FfnProvider):
        stats = FfnStats()

        def __init__(self, sparse_layer: int):
            self.sparse_layer = sparse_layer

        def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:
            if layer != self.sparse_layer:
                return ffn_from_rows(h, layers[layer], cols)
            mask = top_k_mask(predictors[layer].scores(h), sparsity.keep_neurons)  # (T, n_ff)
            return masked_ffn_from_rows(h, layers[layer], cols, mask)

        def close(self) -> None:
            pass

    def loss(sparse_layer: int) -> float:
        one = ModelExecutor(store, manifest, "dense", 1, 128, device="cpu", ffn=OnlyOneLayerSparse(sparse_layer))
        logits = one.forward(torch.tensor([token_ids]), torch.tensor([0]), torch.arange(len(token_ids))[None])
        return float(torch.nn.functional.cross_entropy(logits[0, :-1], torch.tensor(token_ids[1:])))

    expected = [loss(layer) - loss(-1) for layer in range(num_layers)]
    assert max(abs(e) for e in expected) > 1e-3  # keeping a quarter of the neurons does change the loss
    assert increases == pytest.approx(expected, abs=1e-5)


def test_dense_layers_auto_keeps_only_layers_far_more_sensitive_than_the_rest():
    from flashllm.runtime.tools.calibrate import choose_dense_layers

    # what `calibrate` measured on the demo model at 50% sparsity (held-out nats/token, one layer sparse at a time)
    demo_model = [0.184, 0.017, 0.028, 0.035, 0.036, 0.024, 0.034, 0.022, 0.029, 0.012, 0.01, 0.023, 0.004, 0.016,
                  0.014, 0.01, 0.004, 0.0, 0.014, 0.014, 0.013, 0.014, 0.021, 0.022, 0.013, 0.012, 0.001, 0.014, 0.037,
                  0.005]
    assert choose_dense_layers(demo_model) == [0]
    assert choose_dense_layers([0.03] * 30) == []  # evenly sensitive: all stay sparse
    assert choose_dense_layers([0.04, 0.001, 0.002, 0.001]) == []  # an outlier, but too small to pay for itself
    # at most an eighth of the layers, the most sensitive ones
    assert choose_dense_layers([0.2, 0.9, 0.3, 0.8, 0.4, 0.7, 0.5, 0.6] + [0.01] * 24) == [1, 3, 5, 7]


def test_calibration_streaming_the_ffn_from_flash_writes_what_holding_it_writes(tiny_stores, tmp_path):
    """A model whose FFN does not fit in memory is calibrated layer by layer from flash, to the same result."""
    from safetensors.torch import load_file

    from flashllm.protocol.store_format import read_manifest

    results = {}
    for in_memory in (True, False):
        store = str(tmp_path / f"in_memory_{in_memory}")
        shutil.copytree(tiny_stores("llama"), store)
        lines = []
        calibrate(store, calibration_text(), max_tokens=1200, progress=False, log=lines.append, ffn_in_memory=in_memory)
        assert any("read it from flash layer by layer" in line for line in lines) == (not in_memory)
        info = read_manifest(store).sparsity
        results[in_memory] = (info.thresholds, load_file(os.path.join(store, info.file)))
    (held_thresholds, held), (streamed_thresholds, streamed) = results[True], results[False]
    assert streamed_thresholds == held_thresholds
    assert held.keys() == streamed.keys() and all(torch.equal(held[k], streamed[k]) for k in held)


def test_prompts_admitted_together_are_prefilled_in_one_pass_over_the_flash_ffn(tiny_stores):
    """Prompts of different lengths, padded into one forward: the FFN is read once for all of them, and each
    prompt's first token is the one it gets alone."""
    from flashllm.protocol.store_format import read_manifest

    store = tiny_stores("llama")
    ffn_bytes = read_manifest(store).ffn.total_bundle_bytes
    first_token = SamplingParams(max_tokens=1, ignore_eos=True)
    alone = []
    for prompt in PROMPTS:
        with Engine(store, mode="naive", max_batch=1) as engine:
            alone.append(engine.generate([prompt], first_token)[0].tokens)
    with Engine(store, mode="naive", max_batch=len(PROMPTS)) as engine:
        together = [r.tokens for r in engine.generate(PROMPTS, first_token)]
        read_bytes = engine.executor.ffn_stats.read_bytes
    assert together == alone
    assert ffn_bytes <= read_bytes < 2 * ffn_bytes  # one pass, not one per prompt


def test_a_model_that_cannot_fit_on_the_gpu_is_refused_before_loading(calibrated_stores):
    """What goes on the device (resident weights, KV cache, FFN rows) is summed from the store's headers
    and checked against the device's free memory, with the fix named, before anything is allocated."""
    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.executor import DeviceMemoryError, check_device_memory, device_bytes_needed

    store = calibrated_stores("llama")
    manifest = read_manifest(store)
    ffn_float16_bytes = manifest.ffn.total_bundle_bytes // 2  # the store is float32
    needed = {mode: device_bytes_needed(store, manifest, mode, 2, 128, torch.float16, torch.float16,
                                        capacity_rows=[100, 100] if mode == "sparse" else None)
              for mode in ("dense", "naive", "sparse")}
    assert needed["dense"]["FFN rows"] == ffn_float16_bytes
    assert needed["naive"]["FFN rows"] == ffn_float16_bytes // 2  # one of the two layers
    assert needed["sparse"]["FFN rows"] == ffn_float16_bytes * (200 + 160) // 320  # caches + a prefill layer
    assert needed["dense"]["KV cache"] == 2 * 2 * 2 * manifest.arch.num_key_value_heads * 128 \
        * manifest.arch.head_dim * 2  # keys and values, 2 layers, 2 slots, 128 positions, float16
    for mode, parts in needed.items():
        total = sum(parts.values())
        check_device_memory(parts, total, "cuda", mode)  # exactly fits
        with pytest.raises(DeviceMemoryError, match=rf"--mode {mode} on cuda needs .* MiB are free: .*CUDA_VISIBLE"):
            check_device_memory(parts, total - 1, "cuda", mode)
    with pytest.raises(DeviceMemoryError, match="use --mode sparse with --memory"):
        check_device_memory(needed["dense"], 0, "cuda", "dense")


def test_bench_sets_the_device_bytes_against_the_needed_neurons_bytes(calibrated_stores, tmp_path):
    """Per sparse run: device bytes/token (/proc/self/io), the bundles of the neurons read, their ratio, the
    reader's request sizes; the recorded reads replay through the planner simulation."""
    from flashllm.runtime.tools import read_plan_sim
    from flashllm.protocol.store_format import read_manifest
    from flashllm.runtime.tools.bench import load_read_sets, run_bench

    store = calibrated_stores("llama")
    reads_path = str(tmp_path / "reads.npz")
    report = run_bench(store, ["sparse"], None, decode_tokens=6, text=None, eval_tokens=0, keep_fractions=[],
                       runtimes=["inproc"], read_baseline=False, record_reads=reads_path)
    sparse = report["modes"]["sparse"]
    bundle_bytes = read_manifest(store).ffn.bundle_bytes
    assert sparse["needed_bytes_per_token"] == pytest.approx(sparse["neurons_read_per_token"] * bundle_bytes)
    assert sparse["needed_bytes_per_token"] > 0
    assert sparse["device_bytes_per_needed_byte"] == pytest.approx(
        sparse["device_bytes_per_token"] / sparse["needed_bytes_per_token"])
    reads = sparse["decode_reads"]
    assert reads["alignment_bytes"] <= 4096 and reads["alignment_source"] in ("statx", "block_device", "probe", "page")
    measured_steps = 4  # 6 tokens: the prompt's forward gives the first, then 5 decode steps, the first left out
    assert sum(reads["request_size_histogram"].values()) == pytest.approx(reads["requests_per_token"] * measured_steps)
    assert reads["planned_bytes_per_token"] >= reads["wanted_bytes_per_token"] > 0
    read_sets, steps = load_read_sets(reads_path)
    assert steps == measured_steps and read_sets
    assert sum(len(ids) for _, ids in read_sets) * bundle_bytes == pytest.approx(
        reads["wanted_bytes_per_token"] * measured_steps)
    assert read_plan_sim.main(["--reads", reads_path, "--neurons", str(read_manifest(store).arch.intermediate_size),
                               "--json", str(tmp_path / "sim.json")]) == 0
