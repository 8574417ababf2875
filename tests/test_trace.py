"""Activation traces (`--trace`): the sets they replay, and the sparse runtime running on them end to end.

A synthetic store has no predictors; a trace stands in for them, so the
reader, window cache, memory plan and both runtimes run as with a real one.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from cli_run import run_flashllm
from flashllm.workers.activation_trace import ActivationTrace, TraceSpec, parse_trace, save_recorded_trace

WINDOW = 4  # the engine's window counts the token itself: a token reuses the 3 before it


def _new_counts(sets: list[np.ndarray], earlier: int = WINDOW - 1) -> list[int]:
    return [len(np.setdiff1d(ids, np.concatenate(sets[max(0, t - earlier):t]) if t else [])) for t, ids in
            enumerate(sets)]


def test_the_paper_trace_has_the_asked_active_and_new_shares_and_is_seeded():
    trace = ActivationTrace(parse_trace("paper:active=0.1,new=0.04,seed=3"), num_layers=2, num_neurons=1000,
                            window_tokens=WINDOW)
    sets = [trace.active_ids(1, 0, token) for token in range(30)]
    assert {len(ids) for ids in sets} == {100}
    assert _new_counts(sets) == [100] + [40] * 29  # the first token has no window yet
    again = ActivationTrace(parse_trace("paper:active=0.1,new=0.04,seed=3"), 2, 1000, WINDOW)
    assert all(np.array_equal(again.active_ids(1, 0, t), sets[t]) for t in range(30))
    other_seed = ActivationTrace(parse_trace("paper:active=0.1,new=0.04,seed=4"), 2, 1000, WINDOW)
    assert not np.array_equal(other_seed.active_ids(1, 0, 0), sets[0])
    assert not np.array_equal(trace.active_ids(0, 0, 0), sets[0])  # layers and streams have their own
    assert not np.array_equal(trace.active_ids(1, 1, 0), sets[0])


def test_the_paper_defaults_are_its_opt_figures():
    spec = parse_trace("paper")
    assert (spec.active_fraction, spec.new_fraction) == (0.03, 0.024)
    assert parse_trace(str(spec)) == spec and parse_trace("recorded:/x.npz,seed=2") == TraceSpec(
        "recorded", path="/x.npz", seed=2)


def test_a_recorded_trace_keeps_its_active_share_and_overlap_when_rescaled(tmp_path):
    source = ActivationTrace(parse_trace("paper:active=0.2,new=0.05,seed=1"), 3, 200, WINDOW)
    steps = [[source.active_ids(layer, 0, token) for layer in range(3)] for token in range(12)]
    path = str(tmp_path / "trace.npz")
    save_recorded_trace(path, steps, num_neurons=200)
    # 5 stand-ins per source neuron: the shares carry over exactly; layer l replays source layer l * 3 // 6
    rescaled = ActivationTrace(parse_trace(f"recorded:{path}"), num_layers=6, num_neurons=1000, window_tokens=WINDOW)
    sets = [rescaled.active_ids(5, 0, token) for token in range(12)]
    assert [len(ids) for ids in sets] == [5 * len(step[2]) for step in steps]
    assert _new_counts(sets) == [5 * n for n in _new_counts([step[2] for step in steps])]
    assert rescaled.max_active == 5 * 40
    assert np.ptp(sets[0]) > 900  # a source neuron's stand-ins are scattered over the layer
    # not a whole multiple: the shares carry over to within the rounding of one stand-in per source neuron
    odd = ActivationTrace(parse_trace(f"recorded:{path}"), num_layers=3, num_neurons=1234, window_tokens=WINDOW)
    shares = [len(odd.active_ids(0, 0, t)) / 1234 for t in range(12)]
    assert np.allclose(shares, [len(step[0]) / 200 for step in steps], atol=0.01)
    assert np.array_equal(odd.active_ids(0, 0, 12), odd.active_ids(0, 0, 0))  # the recording repeats


@pytest.mark.parametrize("text, message", [
    ("pape", "give paper, paper:active=A,new=N,seed=S or recorded:FILE.npz"),
    ("paper:active=2", "the active share must be in (0, 1]"),
    ("paper:active=0.03,new=0.05", "the new share must be in [0, active=0.03]"),
    ("paper:window=5", "unknown option 'window'; this source takes active, new, seed"),
    ("paper:new=x", "new='x' is not a number"),
    ("recorded", "--trace recorded needs its file: recorded:FILE.npz"),
])
def test_a_bad_trace_is_refused_with_what_to_write(text, message):
    with pytest.raises(ValueError) as refused:
        parse_trace(text)
    assert message in str(refused.value)


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("trace") / "tiny-q4_0")
    assert run_flashllm("synth", "--shape", "tiny-llama", "--dtype", "q4_0", "--out", out, "--quiet").returncode == 0
    return out


def test_an_unreadable_recorded_trace_or_a_keep_fraction_beside_a_trace_is_refused(synth_store, tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a trace")
    run = run_flashllm("generate", "--store", synth_store, "--mode", "sparse", "--runtime", "inproc", "--memory",
                       "8MiB", "--trace", f"recorded:{tmp_path / 'bad.npz'}", "hi")
    assert run.returncode != 0 and "not a readable activation trace" in run.stderr
    assert "--record-trace FILE.npz" in run.stderr
    run = run_flashllm("generate", "--store", synth_store, "--mode", "sparse", "--memory", "8MiB", "--trace", "paper",
                       "--keep-fraction", "0.5", "hi")
    assert run.returncode != 0 and "--keep-fraction does not apply with --trace" in run.stderr
    run = run_flashllm("generate", "--store", synth_store, "--mode", "sparse", "--memory", "8MiB", "hi")
    assert run.returncode != 0 and "flashllm calibrate" in run.stderr  # no predictors and no trace


def test_both_runtimes_replay_a_trace_to_the_same_tokens(synth_store):
    tokens = {}
    for runtime in ("inproc", "workers"):
        run = run_flashllm("generate", "--store", synth_store, "--mode", "sparse", "--runtime", runtime, "--memory",
                           "8MiB", "--trace", "paper:active=0.1,new=0.05", "--max-tokens", "12", "--ignore-eos",
                           "--json", "Hello")
        assert run.returncode == 0, run.stderr
        assert "replayed from a trace, not predicted" in run.stderr
        tokens[runtime] = json.loads(run.stdout.splitlines()[-1])["tokens"]
    assert len(tokens["inproc"]) == 12 and tokens["inproc"] == tokens["workers"]


def test_bench_on_a_paper_trace_reads_the_new_neurons_within_the_plan(synth_store, tmp_path):
    out = tmp_path / "bench.json"
    run = run_flashllm("bench", "--store", synth_store, "--modes", "sparse", "--memory", "8MiB", "--trace",
                       "paper:active=0.1,new=0.05", "--tokens", "24", "--paired-rounds", "0", "--no-read-baseline",
                       "--no-peak-memory", "--json", str(out))
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    trace, sparse = report["trace"], report["modes"]["sparse"]
    assert trace["spec"] == "paper:active=0.1,new=0.05,seed=0" and trace["new_neurons_per_token"] == 4 * 38
    assert sparse["neurons_predicted_per_token"] == 4 * 77  # the trace's sets, every layer every token
    # what the sparse run read: the trace's new neurons (the caches have room for the window)
    assert 0.9 <= sparse["needed_bytes_per_token"] / trace["new_bytes_per_token"] <= 1.1
    plan = sparse["memory_plan"]
    assert plan["resident_bytes"] + plan["predictor_bytes"] + plan["staging_bytes"] + plan["cache_bytes"] \
        <= plan["budget_bytes"] == 8 * 2**20
    assert "device/new" in run.stdout


def test_a_token_of_a_trace_computes_the_traces_set_alone(synth_store):
    """A trace's sets are the neurons each token uses (the others are zeros, as a ReLU model's): the default
    compute set ("auto") does not add the window's cached neurons to them, "window" does."""
    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.activation_trace import parse_trace
    from flashllm.workers.sparse_policy import computes_window
    from flashllm.workers.trace_predictor import TracePredictor

    predictor = TracePredictor(read_manifest(synth_store), parse_trace("paper"), window_tokens=4)
    assert not computes_window("auto", predictor) and computes_window("window", predictor)
    with pytest.raises(ValueError, match="compute set 'all' is not one of auto, predicted, window"):
        computes_window("all", predictor)


def test_a_recorded_trace_from_a_calibrated_store_replays_on_a_synthetic_one(calibrated_stores, synth_store,
                                                                             tmp_path):
    recorded = str(tmp_path / "recorded.npz")
    run = run_flashllm("bench", "--store", calibrated_stores("llama"), "--modes", "sparse", "--tokens", "10",
                       "--memory", "64MiB", "--paired-rounds", "0", "--no-read-baseline", "--no-peak-memory",
                       "--record-trace", recorded, "--json", str(tmp_path / "record.json"))
    assert run.returncode == 0, run.stderr
    data = np.load(recorded)
    layers = int(data["num_layers"])
    source = json.loads((tmp_path / "record.json").read_text())["modes"]["sparse"]
    assert len(data["lengths"]) % layers == 0 and len(data["lengths"]) // layers >= 9  # every decode step
    run = run_flashllm("bench", "--store", synth_store, "--modes", "sparse", "--tokens", "10", "--memory", "8MiB",
                       "--trace", f"recorded:{recorded}", "--paired-rounds", "0", "--no-read-baseline",
                       "--no-peak-memory", "--json", str(tmp_path / "replay.json"))
    assert run.returncode == 0, run.stderr
    replay = json.loads((tmp_path / "replay.json").read_text())
    assert replay["trace"]["spec"] == f"recorded:{recorded}"
    # the recorded share of each layer's neurons, on a store of another shape
    source_share = source["neurons_predicted_per_token"] / (layers * int(data["num_neurons"]))
    synth = replay["modes"]["sparse"]
    from flashllm.protocol.store_format import read_manifest

    arch = read_manifest(synth_store).arch
    replay_share = synth["neurons_predicted_per_token"] / (arch.num_hidden_layers * arch.intermediate_size)
    assert replay_share == pytest.approx(source_share, abs=0.05)


def test_a_budget_too_small_for_a_trace_names_no_set_size_knob(synth_store):
    """The minimum holds no neuron cache (or, on a model this small, whatever of read-ahead and smallest caches is
    less), so it offers neither the trace's active share nor --keep-fraction as a knob."""
    run = run_flashllm("generate", "--store", synth_store, "--mode", "sparse", "--runtime", "inproc", "--memory",
                       "60%", "--trace", "paper:active=0.1,new=0.05", "hi")
    assert run.returncode != 0 and "is too small" in run.stderr and "--mode naive" in run.stderr
    assert "--trace paper:active" not in run.stderr and "--keep-fraction" not in run.stderr
