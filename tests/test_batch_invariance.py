"""Batch-invariant sparse decoding: at temperature 0 a request's tokens do not depend on what runs beside it.

The neuron cache holds the batch's union, but each sequence computes only its own predicted and window
neurons (workers/sparse_policy.py), in both runtimes and through the daemon.
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from daemon_process import running_daemon
from flashllm.runtime.clients.client import AsyncClient, Client
from flashllm.runtime.core.engine import Engine
from flashllm.runtime.core.sampling import SamplingParams

# different lengths, so the batch's sequences sit at different positions
PROMPTS = [[0, 17, 42, 99, 5], [0, 200, 3, 3, 8, 150, 77, 61, 12], [9, 8, 7], [300, 301, 302, 303, 5, 6],
           [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [64, 32], [250, 12, 250, 12, 250], [77, 41, 8, 19]]
STARTS = [0, 0, 1, 2, 3, 3, 5, 6]  # the decode step at which each prompt joins the batch
MAX_TOKENS = 12
KEEP_FRACTION = 0.25  # a quarter of each layer's neurons per token: neighbours' sets differ a lot


def _alone(engine: Engine, prompt: list[int]) -> list[int]:
    return engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))[0].tokens


def _staggered(engine: Engine) -> list[list[int]]:
    """Every prompt through one engine, each joining at its STARTS step while the others decode."""
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    request_ids: list[str] = []
    step = 0
    while len(request_ids) < len(PROMPTS) or engine.has_unfinished():
        for prompt, start in zip(PROMPTS, STARTS):
            if start == step:
                request_ids.append(engine.add_request(prompt, params))
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        step += 1
    return [tokens[request_id] for request_id in request_ids]


# "skip" hands a layer over at its lookahead: the worker runtime then passes each sequence's set on earlier
@pytest.mark.parametrize("runtime,missing_policy", [("inproc", "read"), ("workers", "read"), ("workers", "skip")])
def test_staggered_temperature_0_sparse_sequences_decode_their_single_runs_tokens(calibrated_stores, runtime,
                                                                                  missing_policy):
    store = calibrated_stores("llama")
    with Engine(store, mode="sparse", runtime=runtime, max_batch=len(PROMPTS),
                ffn_options={"keep_fraction": KEEP_FRACTION, "missing_policy": missing_policy}) as engine:
        alone = [_alone(engine, prompt) for prompt in PROMPTS]
        together = _staggered(engine)
        batches = [s["batch"] for s in engine.token_stats]
    assert max(batches) == len(PROMPTS)  # all eight decoded in one step at some point
    assert [len(t) for t in together] == [MAX_TOKENS] * len(PROMPTS)
    for prompt, single, batched in zip(PROMPTS, alone, together):
        assert batched == single, f"prompt {prompt}: alone {single}, in the batch {batched}"


def test_the_union_option_lets_neighbours_change_tokens(calibrated_stores):
    """SparseOptions.batch_invariant=False (every sequence computes the batch's union, kept for the bench's
    comparison): the same staggered batch no longer matches the single runs, which is what the default fixes."""
    store = calibrated_stores("llama")
    with Engine(store, mode="sparse", max_batch=len(PROMPTS),
                ffn_options={"keep_fraction": KEEP_FRACTION, "batch_invariant": False}) as engine:
        alone = [_alone(engine, prompt) for prompt in PROMPTS]
        together = _staggered(engine)
    assert sum(a != t for a, t in zip(alone, together)) > 0


def _predictor_and_pins(store: str):
    """The store's manifest, its calibrated predictor at KEEP_FRACTION and per layer the (n_ff,) bool mask of
    its pinned (hot) neurons: what the planner is made from."""
    from flashllm.workers.predictor import SparsityPredictor
    from flashllm.workers.store_reader import open_store

    manifest = open_store(store)
    predictor = SparsityPredictor(store, manifest, keep_fraction=KEEP_FRACTION)
    pinned = [np.zeros(predictor.num_neurons, dtype=bool) for _ in range(predictor.num_layers)]
    for mask, hot in zip(pinned, predictor.hot_ids):
        mask[hot] = True
    return manifest, predictor, pinned


def test_a_sequences_computed_set_does_not_depend_on_its_neighbour(calibrated_stores):
    """The planner (workers/sparse_policy.py), both runtimes' one decision: sequence A's computed neurons at
    every layer and step are the same with or without a neighbour B in the batch (its own predicted sets, its
    own window, the pinned), though the cache's union differs; a new sequence in A's slot starts afresh."""
    from flashllm.workers.sparse_policy import CachedLayer, MaskedLayer, SparseStepPlanner

    manifest, predictor, pinned = _predictor_and_pins(calibrated_stores("llama"))
    n, layers = predictor.num_neurons, predictor.num_layers
    d = manifest.arch.hidden_size
    inputs = torch.randn(4, layers, 2, d, generator=torch.Generator().manual_seed(1))  # (steps, layers, seqs, d)

    def run(with_neighbour: bool, fits: bool = True) -> tuple[list[torch.Tensor], list[np.ndarray]]:
        planner = SparseStepPlanner(predictor, [n] * layers, pinned, "read", window_tokens=3,
                                    compute_set="window")
        if not fits:  # the cached path's rule says no: every layer reads whole
            planner.fits = lambda layer, ids: False
        computed, unions = [], []
        for step in range(inputs.shape[0]):
            slots = np.array([5, 2]) if with_neighbour else np.array([5])
            planner.begin_step(1, slots, np.array([step == 0] * len(slots)))
            for layer in range(layers):
                decision = planner.plan_layer(layer, inputs[step, layer, : len(slots)])  # (B, d)
                if fits:
                    assert type(decision) is CachedLayer
                    computed.append(decision.computed[0])  # (n_ff,) sequence A's
                    unions.append(decision.predicted)
                else:  # nothing fits: every layer reads whole, each token masked to its own set and window
                    assert type(decision) is MaskedLayer
                    computed.append(decision.mask[0])
        return computed, unions

    with torch.inference_mode():
        alone, alone_unions = run(with_neighbour=False)
        beside, beside_unions = run(with_neighbour=True)
        masked_alone, _ = run(with_neighbour=False, fits=False)
        masked_beside, _ = run(with_neighbour=True, fits=False)
    for a, b in zip(alone, beside):
        assert torch.equal(a, b)
    assert any(len(b) > len(a) for a, b in zip(alone_unions, beside_unions))  # the cache's union is larger
    for a, b in zip(masked_alone, masked_beside):
        assert torch.equal(a, b)
    for cached, masked in zip(alone, masked_alone):  # and the path does not change it either
        assert torch.equal(cached, masked)
    # the masked path keeps A's window too: later steps compute more than their own prediction
    assert masked_alone[-1].sum() > masked_alone[layers - 1].sum()

    # A's window: step 2's set holds steps 0-2's own sets (window 3), not step 0's any more at step 3
    planner = SparseStepPlanner(predictor, [n] * layers, pinned, "read", window_tokens=3, compute_set="window")
    with torch.inference_mode():
        own = []
        for step in range(4):
            planner.begin_step(1, np.array([5]), np.array([step == 0]))
            decision = planner.plan_layer(0, inputs[step, 0, :1])
            own.append(predictor.predict_mask("same", 0, inputs[step, 0, :1])[0])
            expected = torch.from_numpy(pinned[0]).clone()
            for earlier in own[-3:]:
                expected |= earlier
            assert torch.equal(decision.computed[0], expected)
        planner.begin_step(1, np.array([5]), np.array([True]))  # a new sequence in slot 5: no history
        decision = planner.plan_layer(0, inputs[0, 0, :1])
        assert torch.equal(decision.computed[0], own[0] | torch.from_numpy(pinned[0]))


@pytest.mark.parametrize("kind, auto_computes_window", [("llama", True), ("opt", False)])
def test_what_a_token_computes_predicted_or_with_its_window(calibrated_stores, kind, auto_computes_window):
    """compute_set "predicted": each step's computed set is the token's own prediction and the pinned, the
    same with a cache of every neuron as with one just large enough; "window" adds earlier tokens' neurons
    where the cache has room, so there its compute grows with the budget; "auto" (the default) is "window"
    for a SwiGLU model (llama: its threshold leaves out nonzero contributions), "predicted" for a ReLU one."""
    from flashllm.workers.sparse_policy import SparseStepPlanner

    manifest, predictor, pinned = _predictor_and_pins(calibrated_stores(kind))
    n, layers = predictor.num_neurons, predictor.num_layers
    inputs = torch.randn(4, 1, manifest.arch.hidden_size, generator=torch.Generator().manual_seed(2))  # (steps, 1, d)

    def computed_sets(capacity_rows: int, compute_set: str | None) -> list[torch.Tensor]:
        options = {} if compute_set is None else {"compute_set": compute_set}
        planner = SparseStepPlanner(predictor, [capacity_rows] * layers, pinned, "read", window_tokens=4, **options)
        sets = []
        for step in range(inputs.shape[0]):
            planner.begin_step(1, np.array([0]), np.array([step == 0]))
            sets.append(planner.plan_layer(0, inputs[step]).computed[0])  # (n_ff,)
        return sets

    with torch.inference_mode():
        own = [predictor.predict_mask("same", 0, inputs[step])[0] | torch.from_numpy(pinned[0])
               for step in range(inputs.shape[0])]
        whole = computed_sets(n, "predicted")
        just_enough = computed_sets(max(int(s.sum()) for s in own), "predicted")
        widened = computed_sets(n, "window")
        default = computed_sets(n, None)
    for step, (a, b, expected) in enumerate(zip(whole, just_enough, own)):
        assert torch.equal(a, expected) and torch.equal(b, expected), f"step {step}"
    assert torch.equal(widened[0], own[0])  # the first token has no window yet
    assert widened[-1].sum() > own[-1].sum()  # later ones compute their window's neurons too
    for a, b in zip(default, widened if auto_computes_window else own):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def calibrated_q4_0_store(tiny_models, tmp_path_factory):
    """The tiny llama as a q4_0 store (4-bit, as the demo's), calibrated: on a CPU its products are the integer
    kernels', which give each row the same bits whatever the batch."""
    from flashllm.runtime.tools.calibrate import calibrate
    from flashllm.runtime.tools.convert.store_writer import convert
    from tests.conftest import calibration_text

    out = str(tmp_path_factory.mktemp("invariance") / "llama-q4_0")
    convert(tiny_models("llama"), out, dtype="q4_0", progress=False)
    calibrate(out, calibration_text(), max_tokens=800, progress=False, log=lambda *_: None)
    return out


def _logits_of(engine: Engine, run) -> dict[str, list[torch.Tensor]]:
    """run(engine) → its request ids' logits at every sampled position, in request order."""
    seen: dict[str, list[torch.Tensor]] = {}
    engine.logits_hook = lambda request_id, logits: seen.setdefault(request_id, []).append(logits.clone())
    run(engine)
    engine.logits_hook = None
    return seen


@pytest.mark.parametrize("runtime", ["inproc", "workers"])
def test_a_quantized_sequences_logits_are_bitwise_the_same_in_a_batch_as_alone(calibrated_q4_0_store, runtime):
    """Not just the same greedy tokens: the same logits, bit for bit, at every position, at a budget whose
    caches have little room beyond one sequence's sets (neighbours crowd them, layers fall back to whole-layer
    reads). Each token's FFN is summed over its own neurons in neuron-id order on either path, attention runs
    per sequence, and prompts are prefilled one by one."""
    from flashllm.workers.memory_plan import plan_for_store
    from flashllm.workers.store_reader import open_store

    store = calibrated_q4_0_store
    roomy = plan_for_store(store, open_store(store), 2**40, "sparse", 4, 0, keep_fraction=KEEP_FRACTION)
    budget = roomy.budget_for_spare_rows(40 * len(roomy.capacity_rows))
    with Engine(store, mode="sparse", runtime=runtime, max_batch=len(PROMPTS),
                ffn_options={"keep_fraction": KEEP_FRACTION, "memory_budget_bytes": budget}) as engine:
        alone = [next(iter(_logits_of(engine, lambda e: _alone(e, prompt)).values())) for prompt in PROMPTS]
        together = list(_logits_of(engine, _staggered).values())
        paths = {s["neurons_read"] > 0 for s in engine.token_stats}
    assert len(together) == len(PROMPTS)
    for prompt, single, batched in zip(PROMPTS, alone, together):
        assert len(single) == len(batched) == MAX_TOKENS
        for position, (a, b) in enumerate(zip(single, batched)):
            assert torch.equal(a, b), f"prompt {prompt}, position {position}: max |Δ| {float((a - b).abs().max())}"
    assert paths == {True}  # every decode step read neurons: the caches were too small to hold them all


def test_an_uncached_layers_sums_from_its_bundles_are_bitwise_the_same_in_a_batch_as_alone_in_both_runtimes(
        calibrated_q4_0_store, monkeypatch):
    """A layer without a neuron cache reads its tokens' sets at every decode step and multiplies them from the
    bundles as read, in float32 (bundle_products.DirectSums), not through the int4 kernels: a sequence's logits
    are still the same bits beside up to seven others as alone, and the same in the worker processes as in-process
    (whose logits would differ in their low bits had either taken the kernels)."""
    from flashllm.workers.flash_io import bundle_products
    from flashllm.workers.store_reader import open_store

    store = calibrated_q4_0_store
    direct_rows: list[int] = []  # in-process: the rows of each chunk multiplied from its bundles
    add = bundle_products.DirectSums.add
    monkeypatch.setattr(bundle_products.DirectSums, "add",
                        lambda sums, rows, keep: (direct_rows.append(len(rows.neuron_ids)), add(sums, rows, keep))[1])
    neurons = open_store(store).arch.intermediate_size
    logits = {}
    for runtime in ("inproc", "workers"):
        with Engine(store, mode="sparse", runtime=runtime, max_batch=len(PROMPTS),
                    ffn_options={"keep_fraction": KEEP_FRACTION, "capacity_rows": [neurons, 0]}) as engine:
            alone = [next(iter(_logits_of(engine, lambda e: _alone(e, prompt)).values())) for prompt in PROMPTS]
            together = list(_logits_of(engine, _staggered).values())
        logits[runtime] = (alone, together)
    assert direct_rows and max(direct_rows) > min(direct_rows)  # decode steps of one and of several sequences
    for runtime, (alone, together) in logits.items():
        assert len(together) == len(PROMPTS)
        for prompt, single, batched, reference in zip(PROMPTS, alone, together, logits["inproc"][0]):
            assert len(single) == len(batched) == MAX_TOKENS
            for position, (a, b, c) in enumerate(zip(single, batched, reference)):
                assert torch.equal(a, b) and torch.equal(a, c), f"{runtime}, prompt {prompt}, position {position}"


DAEMON_PROMPTS = ["The quick brown fox", "Flash memory is", "Paris is the capital", "def add(a, b):",
                  "1 2 3 4", "Large language models", "Berlin is", "The lazy dog"]
DAEMON_REQUESTS = 32


async def test_32_concurrent_temperature_0_sparse_requests_to_a_daemon_equal_their_single_runs(calibrated_stores):
    args = ["--mode", "sparse", "--runtime", "workers", "--keep-fraction", str(KEEP_FRACTION),
            "--max-batch", str(DAEMON_REQUESTS)]
    with running_daemon(calibrated_stores("llama"), args) as daemon:
        with Client(daemon.socket_path) as client:
            alone = {p: client.generate(p, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0).token_ids
                     for p in DAEMON_PROMPTS}

        async def one_request(index: int) -> tuple[str, list[int]]:
            prompt = DAEMON_PROMPTS[index % len(DAEMON_PROMPTS)]
            async with AsyncClient(daemon.socket_path) as client:
                final = await client.generate(prompt, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0)
            return prompt, final.token_ids

        results = await asyncio.gather(*(one_request(i) for i in range(DAEMON_REQUESTS)))
    identical = sum(tokens == alone[prompt] for prompt, tokens in results)
    assert identical == DAEMON_REQUESTS, f"{identical}/{DAEMON_REQUESTS} identical to their single runs"


def test_bench_states_the_cost_of_invariance_at_a_batch(calibrated_stores, tmp_path, capsys):
    """`flashllm bench --batch-invariance 4`: ms/token of a batch of 4, own neurons against the union, and how
    many sequences keep their single run's tokens (all of them under the invariant rule)."""
    import json

    from flashllm.runtime.clients.cli import main as cli_main

    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--store", calibrated_stores("llama"), "--modes", "sparse", "--tokens", "6",
                     "--keep-fraction", str(KEEP_FRACTION), "--batch-invariance", "4", "--paired-rounds", "1",
                     "--no-read-baseline", "--no-peak-memory", "--json", str(out)]) == 0
    [run] = json.loads(out.read_text())["batch_invariance"]
    assert run["batch"] == 4 and run["runtime"] == "inproc"
    assert run["identical_to_single_runs"]["invariant"] == run["identical_to_single_runs"]["dense"] == 4
    assert run["mean_tokens_before_a_difference"]["invariant"] == 6
    assert all(ms > 0 for ms in run["ms_per_token"].values())
    assert run["ms_per_token"]["invariant"] == pytest.approx(run["step_ms"]["invariant"] / 4)
    assert "batch of 4" in capsys.readouterr().out
