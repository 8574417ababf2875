"""Set operations on neuron ids, through a mask over the layer's neurons.

Ids are small non-negative integers (< n_ff), and a decode step does a dozen
set operations per layer. numpy 2's np.unique / union1d / setdiff1d hash or
sort their input, which costs more per call than marking a (n_ff,) bool mask
(docs/benchmarks.md, "Figures moved out of the code"); a mask's result also
comes out sorted.
"""
from __future__ import annotations

import numpy as np


def union_ids(num_neurons: int, *id_sets: np.ndarray) -> np.ndarray:
    """Sorted unique int64 ids in any of `id_sets` (each ids < num_neurons; duplicates allowed)."""
    marked = np.zeros(num_neurons, dtype=bool)  # (num_neurons,)
    for ids in id_sets:
        marked[ids] = True
    return np.flatnonzero(marked)  # (u,) int64, sorted


def difference_ids(num_neurons: int, ids: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The ids not in `removed`, in their order (sorted in, sorted out)."""
    marked = np.zeros(num_neurons, dtype=bool)  # (num_neurons,)
    marked[removed] = True
    return ids[~marked[ids]]


def find_sorted(sorted_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `ids` sits in `sorted_ids` (sorted unique, not empty): (positions (k,), found (k,) bool);
    a position where found is False is in range but names another neuron."""
    positions = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)  # (k,)
    return positions, sorted_ids[positions] == ids


def staged_positions(staged_ids: np.ndarray, read_ids: np.ndarray) -> np.ndarray | None:
    """Where each of `read_ids` sits among rows read ahead for `staged_ids` (sorted, not empty), or None when
    they do not hold every one: the prefetch worker and compute both decide by this whether compute takes a
    layer's LayerStaged rows as they are."""
    positions, found = find_sorted(staged_ids, read_ids)
    return positions if found.all() else None
