"""What batch-invariant sparse decoding costs: ms/token of a batch, each sequence computing only its own neurons
(SparseOptions.batch_invariant, the default) against every sequence computing the batch's union (the old rule).

    flashllm bench --store S --modes sparse --batch-invariance 8 --json out.json

Both engines are open at once and decode the same batch of prompts in turns, round after round (the device's
speed drifts over minutes: see bench.paired_speed). Beside the speed, each run counts the sequences whose greedy
tokens in the batch equal their single run's, and how many tokens they share before the first difference; the
dense mode's counts are the reference (its matrix products can round a row differently in a batch than alone).
"""
from __future__ import annotations

import statistics
from contextlib import ExitStack
from dataclasses import replace

from flashllm.runtime.core.engine import Engine
from flashllm.runtime.core.sampling import SamplingParams
from flashllm.runtime.core.engine_config import EngineConfig, SparseOptions

# distinct openings, so the sequences of a batch predict different neurons
BATCH_PROMPTS = ["The history of the printing press begins", "Flash memory keeps its bits without power because",
                 "A recipe for bread needs", "The river flowed past the old mill and", "In 1969 the first people to",
                 "def fibonacci(n):", "The committee met on Tuesday to decide", "Photosynthesis turns sunlight into"]
RUNS = {"invariant": True, "union": False}  # run name → SparseOptions.batch_invariant


def batch_prompts(batch: int) -> list[str]:
    """`batch` distinct prompts (BATCH_PROMPTS, numbered past their count)."""
    return [BATCH_PROMPTS[i % len(BATCH_PROMPTS)] + (f" ({i // len(BATCH_PROMPTS)})" if i >= len(BATCH_PROMPTS)
                                                      else "") for i in range(batch)]


def _decode_step_ms(engine: Engine, first_stat: int, batch: int) -> list[float]:
    """The ms of each decode step since token_stats[first_stat] that ran the whole batch."""
    return [st["ms"] for st in engine.token_stats[first_stat:] if st["batch"] == batch]


def _agreement(alone: list[list[int]], together: list[list[int]]) -> dict:
    """How far each sequence's batch tokens follow its single run: identical sequences, and the mean count of
    tokens before the first difference."""
    prefixes = []
    for a, t in zip(alone, together):
        same = next((i for i, (x, y) in enumerate(zip(a, t)) if x != y), min(len(a), len(t)))
        prefixes.append(same)
    return {"identical": sum(a == t for a, t in zip(alone, together)),
            "mean_tokens_before_a_difference": sum(prefixes) / len(prefixes)}


def _alone_and_together(engine: Engine, prompts: list[str], params: SamplingParams) -> dict:
    alone = [engine.generate([prompt], params)[0].tokens for prompt in prompts]
    return _agreement(alone, [result.tokens for result in engine.generate(prompts, params)])


def batch_invariance_cost(store: str, config: EngineConfig, batch: int, decode_tokens: int, rounds: int) -> dict:
    """config: the sparse run's EngineConfig (max_batch and batch_invariant are set here) → per run the median
    ms per decode step of `batch` sequences and per token (step / batch), per round too, and how many of the
    batch's sequences decode their single run's tokens."""
    if batch < 2:
        raise ValueError(f"--batch-invariance {batch}: give a batch of at least 2 sequences, e.g. 8")
    prompts = batch_prompts(batch)
    params = SamplingParams(max_tokens=decode_tokens, ignore_eos=True)
    sparse = config.sparse or SparseOptions()
    step_ms: dict[str, list[float]] = {name: [] for name in RUNS}
    with Engine(store, config=replace(config, mode="dense", runtime="inproc", sparse=None, max_batch=batch,
                                      memory_budget_bytes=None, resident_dtype=None)) as dense:
        agreement = {"dense": _alone_and_together(dense, prompts, params)}
    with ExitStack() as stack:
        engines = {name: stack.enter_context(Engine(store, config=replace(
            config, max_batch=batch, sparse=replace(sparse, batch_invariant=invariant))))
            for name, invariant in RUNS.items()}
        for name, engine in engines.items():
            agreement[name] = _alone_and_together(engine, prompts, params)
        for _ in range(rounds):
            for name, engine in engines.items():
                first = len(engine.token_stats)
                engine.generate(prompts, params)
                step_ms[name].append(_median(_decode_step_ms(engine, first, batch)))
        runtime = next(iter(engines.values())).executor.runtime
    medians = {name: _median(values) for name, values in step_ms.items()}
    return {"batch": batch, "rounds": rounds, "decode_tokens": decode_tokens, "runtime": runtime,
            "step_ms_per_round": step_ms, "step_ms": medians,
            "ms_per_token": {name: ms / batch for name, ms in medians.items()},
            "invariant_over_union": medians["invariant"] / medians["union"],
            "identical_to_single_runs": {name: a["identical"] for name, a in agreement.items()},
            "mean_tokens_before_a_difference": {name: a["mean_tokens_before_a_difference"]
                                                for name, a in agreement.items()}}


def _median(values: list[float]) -> float:
    if not values:
        raise ValueError("no decode step ran the whole batch: raise --tokens")
    return statistics.median(values)
