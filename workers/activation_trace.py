"""Activation traces: per-layer active-neuron sets replayed in place of a predictor's.

A synthetic store (`flashllm synth`) has random weights, so no predictor can be
calibrated on it; its speed, bytes and memory are still real if the sets of
neurons a token asks for follow a real model's statistics. Two sources:

    paper        seeded sets with a given share of each layer's neurons active per
                 token and a given share new per token: not in the union of the
                 sets of the earlier tokens the engine's sliding window keeps
                 (--neuron-window K counts the token itself: K - 1 earlier ones),
                 which is what a token reads. Defaults from "LLM in a flash" for
                 OPT-6.7B: about 97% of the FFN neurons inactive; with a window of
                 5 tokens about 2.4% of the neurons are new per token.
    recorded     the sets a calibrated predictor chose on a real model
                 (`flashllm bench --record-trace FILE`), rescaled to the target
                 shape: target layer l replays source layer l·L_src/L; each target
                 neuron stands for one source neuron (a seeded shuffle, so a
                 source neuron's stand-ins are scattered over the layer as active
                 neurons are, not contiguous), which keeps the active share and the
                 token-to-token overlap.

`TraceSpec` is what the user asks for (`--trace paper`, `--trace
paper:active=0.05,new=0.02,seed=3`, `--trace recorded:FILE.npz`); it travels in
SparseOptions into the worker processes, so this module is torch-free.
`ActivationTrace` generates the sets; workers/trace_predictor.py serves them
through the predictor interface.

The paper's sets carry no hot neurons and no preference among the window's
neurons beyond the stated shares: a token reuses a uniform sample of the
window's union and draws its new neurons uniformly from the rest.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

PAPER_ACTIVE_FRACTION = 0.03  # OPT-6.7B: ~97% of FFN neurons inactive per token
PAPER_NEW_FRACTION = 0.024  # of a layer's neurons, not among the last window's, per token (window of 5)
TRACE_SOURCES = ("paper", "recorded")
TRACE_FORMAT = "flashllm-activation-trace-1"


@dataclass(frozen=True)
class TraceSpec:
    """Where a sparse run's active-neuron sets come from instead of the store's predictors."""

    source: str  # "paper" or "recorded"
    path: str | None = None  # recorded: the .npz `flashllm bench --record-trace` wrote
    active_fraction: float = PAPER_ACTIVE_FRACTION  # paper: neurons active per token, of each layer's
    new_fraction: float = PAPER_NEW_FRACTION  # paper: neurons not in the window's union, of each layer's
    seed: int = 0

    def __post_init__(self) -> None:
        if self.source not in TRACE_SOURCES:
            raise ValueError(f"--trace {self.source!r}: give paper, paper:active=A,new=N,seed=S or recorded:FILE.npz")
        if self.source == "recorded" and not self.path:
            raise ValueError("--trace recorded needs its file: recorded:FILE.npz (written by `flashllm bench "
                             "--record-trace FILE.npz` on a calibrated store)")
        if not 0.0 < self.active_fraction <= 1.0:
            raise ValueError(f"--trace active={self.active_fraction}: the active share must be in (0, 1]")
        if not 0.0 <= self.new_fraction <= self.active_fraction:
            raise ValueError(f"--trace new={self.new_fraction}: the new share must be in [0, active="
                             f"{self.active_fraction}] (new neurons are part of a token's active set)")

    def __str__(self) -> str:
        """The --trace text that parses back to this spec."""
        if self.source == "recorded":
            return f"recorded:{self.path}" + (f",seed={self.seed}" if self.seed else "")
        return f"paper:active={self.active_fraction:g},new={self.new_fraction:g},seed={self.seed}"


def parse_trace(text: str) -> TraceSpec:
    """--trace: 'paper', 'paper:active=0.03,new=0.024,seed=0', 'recorded:FILE.npz' (optionally ',seed=S')."""
    source, _, rest = text.strip().partition(":")
    if source == "recorded":
        path, _, options = rest.partition(",")
        return TraceSpec("recorded", path=path or None, **_trace_options(text, options, ("seed",)))
    return TraceSpec(source, **_trace_options(text, rest, ("active", "new", "seed")))


def _trace_options(text: str, options: str, allowed: tuple[str, ...]) -> dict:
    names = {"active": "active_fraction", "new": "new_fraction", "seed": "seed"}
    parsed = {}
    for item in filter(None, (part.strip() for part in options.split(","))):
        key, _, value = item.partition("=")
        if key not in allowed:
            raise ValueError(f"--trace {text!r}: unknown option {key!r}; this source takes {', '.join(allowed)}")
        try:
            parsed[names[key]] = int(value) if key == "seed" else float(value)
        except ValueError:
            raise ValueError(f"--trace {text!r}: {key}={value!r} is not a number") from None
    return parsed


class ActivationTrace:
    """The sets of one run: `active_ids(layer, stream, token)`, each (layer, stream) generated in token order.

    A stream is one sequence of the batch (its row); each has its own seeded history, so a batch of B
    sequences asks for B streams' sets per token. A pass may ask for any token from the one given to
    `forget_before` on (a prompt's tokens are asked once per predictor kind)."""

    def __init__(self, spec: TraceSpec, num_layers: int, num_neurons: int, window_tokens: int):
        self.spec, self.num_layers, self.num_neurons = spec, num_layers, num_neurons
        self.window_tokens = window_tokens
        self._streams: dict[tuple[int, int], _Stream] = {}
        self._recorded = RecordedSets.load(spec.path, num_layers, num_neurons, spec.seed) \
            if spec.source == "recorded" else None

    @property
    def max_active(self) -> int:
        """The most neurons a token asks for in any layer (what the memory plan reserves per layer)."""
        if self._recorded is not None:
            return self._recorded.max_active
        return max(1, round(self.spec.active_fraction * self.num_neurons))

    def forget_before(self, token: int) -> None:
        """No set of a token before this one is asked for again."""
        for generated in self._streams.values():
            generated.forget_before(token)

    def active_ids(self, layer: int, stream: int, token: int) -> np.ndarray:
        """(k,) sorted int64 ids active at `token` of `stream` in `layer`."""
        if self._recorded is not None:
            return self._recorded.active_ids(layer, token + 7 * stream)  # streams start at different tokens
        key = (layer, stream)
        if key not in self._streams:
            self._streams[key] = _Stream(self.spec, self.num_neurons, self.window_tokens, layer, stream)
        return self._streams[key].at(token)


class _Stream:
    """One layer's paper sets for one sequence, generated token by token (the window's union kept as counts)."""

    def __init__(self, spec: TraceSpec, num_neurons: int, window_tokens: int, layer: int, stream: int):
        self.rng = np.random.default_rng([spec.seed, layer, stream])
        self.num_neurons = num_neurons
        self.active = max(1, round(spec.active_fraction * num_neurons))
        self.new = min(self.active, round(spec.new_fraction * num_neurons))
        # the earlier tokens whose neurons the engine's window keeps cached when a token starts: its window
        # counts the token itself (workers/flash_io/neuron_cache.py)
        self.window: collections.deque[np.ndarray] = collections.deque(maxlen=window_tokens - 1)
        self.in_window = np.zeros(num_neurons, dtype=np.int32)  # (n,) tokens of the window that used each neuron
        self.token = -1
        self.kept: dict[int, np.ndarray] = {}  # token → its set, from the first token still asked for

    def forget_before(self, token: int) -> None:
        for old in [t for t in self.kept if t < token]:
            del self.kept[old]

    def at(self, token: int) -> np.ndarray:
        while self.token < token:
            self._advance()
        if token not in self.kept:
            raise ValueError(f"activation trace asked for token {token} after forgetting it (it is at token "
                             f"{self.token})")
        return self.kept[token]

    def _advance(self) -> None:
        held = np.flatnonzero(self.in_window)  # (u,) the window's union
        reuse = min(len(held), self.active - self.new) if self.token >= 0 else 0
        fresh_pool = np.flatnonzero(self.in_window == 0)  # (n - u,)
        fresh = min(len(fresh_pool), self.active - reuse)
        ids = np.concatenate((self.rng.choice(held, reuse, replace=False),
                              self.rng.choice(fresh_pool, fresh, replace=False)))
        ids.sort()
        if self.window.maxlen:
            if len(self.window) == self.window.maxlen:
                self.in_window[self.window[0]] -= 1
            self.window.append(ids)
            self.in_window[ids] += 1
        self.token += 1
        self.kept[self.token] = ids


class RecordedSets:
    """A recorded trace rescaled to a target shape (see the module docstring)."""

    def __init__(self, per_step: list[list[np.ndarray]], source_neurons: int, num_layers: int, num_neurons: int,
                 seed: int):
        self.source_layers = len(per_step[0])
        self.steps = len(per_step)
        self.num_layers, self.num_neurons = num_layers, num_neurons
        self.layer_of = [layer * self.source_layers // num_layers for layer in range(num_layers)]
        rank = np.random.default_rng([seed, num_neurons]).permutation(num_neurons)  # (n,) each neuron's place
        self.source_of = (rank * source_neurons) // num_neurons  # (n,) the source neuron each target stands for
        self.per_step = per_step
        self.source_neurons = source_neurons
        self.max_active = max(1, max(int(self._masks(step, layer).sum())
                                     for step in range(self.steps) for layer in range(num_layers)))

    @staticmethod
    def load(path: str, num_layers: int, num_neurons: int, seed: int) -> "RecordedSets":
        try:
            data = np.load(path)
            if str(data["format"]) != TRACE_FORMAT:
                raise ValueError(f"format {str(data['format'])!r}, expected {TRACE_FORMAT!r}")
            lengths, ids = data["lengths"], data["ids"]
            source_layers, source_neurons = int(data["num_layers"]), int(data["num_neurons"])
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"--trace recorded:{path}: not a readable activation trace ({exc}); write one with "
                             "`flashllm bench --store CALIBRATED_STORE --modes sparse --record-trace FILE.npz`") \
                from None
        if len(lengths) == 0 or len(lengths) % source_layers:
            raise ValueError(f"--trace recorded:{path}: {len(lengths)} sets is not whole steps of {source_layers} "
                             "layers")
        bounds = np.concatenate(([0], np.cumsum(lengths)))
        sets = [ids[start:end].astype(np.int64) for start, end in zip(bounds[:-1], bounds[1:])]
        per_step = [sets[step:step + source_layers] for step in range(0, len(sets), source_layers)]
        return RecordedSets(per_step, source_neurons, num_layers, num_neurons, seed)

    def _masks(self, step: int, layer: int) -> np.ndarray:
        source_active = np.zeros(self.source_neurons, dtype=bool)  # (n_src,)
        source_active[self.per_step[step][self.layer_of[layer]]] = True
        return source_active[self.source_of]  # (n,)

    def active_ids(self, layer: int, token: int) -> np.ndarray:
        return np.flatnonzero(self._masks(token % self.steps, layer))


def save_recorded_trace(path: str, per_step_sets: list[list[np.ndarray]], num_neurons: int) -> None:
    """per_step_sets[t][l]: layer l's active ids at decode step t (every layer every step)."""
    flat = [ids for step in per_step_sets for ids in step]
    np.savez_compressed(path, format=np.str_(TRACE_FORMAT), num_layers=np.int64(len(per_step_sets[0])),
                        num_neurons=np.int64(num_neurons),
                        lengths=np.array([len(ids) for ids in flat], dtype=np.int64),
                        ids=np.concatenate(flat).astype(np.uint16 if num_neurons < 2**16 else np.int32))
