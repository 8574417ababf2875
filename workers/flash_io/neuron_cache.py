"""One layer's DRAM cache of FFN neuron bundles: the paper's preallocated matrix.

Memory layout: a (capacity_rows, bundle_elements) matrix allocated once. Rows [0, num_rows) are the cached
neurons, packed, so `dense_rows()` is a contiguous matrix the compute worker
multiplies directly (gathering rows per call is slower than the dense FFN).

    rows:      [ id 7 ][ id 2 ][ id 40 ][ id 9 ][ free ][ free ]
    slot_ids:  [   7   ,   2   ,   40   ,   9   ,  -1   ,  -1  ]
    slot_of:   id -> row, -1 when the neuron is not cached

Inserting appends at num_rows. Deleting moves the last rows into the freed
slots, so nothing is reallocated and rows never leave the packed prefix.

A quantized store's cache on the CPU holds no such matrix: its neurons are
held once, in the compute kernels' layouts (flash_io/kernel_rows.py), where
each keeps its slot while cached; this class then keeps the ids, the window
and the LRU order as above, and moves ids only.

Which neurons stay (the paper's sliding window): every neuron used by one of
the last `window_tokens` tokens, plus pinned hot neurons (PowerInfer's
hot/cold split: hot neurons are loaded once and never evicted). A token's
flow, driven by the prefetcher:

    cache.advance_window(active_ids)     # record this token's predicted set (a batch: the union)
    cache.evict_outside_window()         # drop what no recent token used
    missing = cache.plan_token(active_ids)   # counts hits/misses; makes room (LRU) if needed
    cache.insert(missing, partial(reader.read_neurons, layer))
    missing = cache.plan_late(same_ids)      # policy "read": the same-layer check's set joins it
    cache.insert(missing, ...)

Every change bumps `version`, which a "layer ready (version)" message carries.
Single writer: only the prefetcher mutates a layer's cache, and only while
compute is not inside that layer.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import numpy as np

from flashllm.workers.flash_io.bundle_reader import numpy_dtype_of_store
from flashllm.workers.flash_io.kernel_rows import KernelRows
from flashllm.workers.flash_io.neuron_ids import difference_ids, union_ids

DEFAULT_WINDOW_TOKENS = 4  # the paper's k: 4..5 tokens

# rows_filler(ids, out): write the bundles of ids (k,) into out (k, bundle_elements),
# e.g. functools.partial(BundleReader.read_neurons, layer).
RowsFiller = Callable[[np.ndarray, np.ndarray], None]


class GrowingRows:
    """rows(k): a (k, elements) view of one buffer that grows to the largest k asked for; its contents are
    whatever the last caller left (callers fill the rows they take)."""

    def __init__(self, elements: int, dtype):
        self._rows = np.empty((0, elements), dtype=dtype)

    @property
    def nbytes(self) -> int:
        """Bytes the buffer holds now (its largest request so far)."""
        return self._rows.nbytes

    def __call__(self, count: int) -> np.ndarray:
        if self._rows.shape[0] < count:
            self._rows = np.empty((count, self._rows.shape[1]), dtype=self._rows.dtype)
        return self._rows[:count]


class CacheCapacityError(RuntimeError):
    """A token needs more neurons resident than the layer cache can hold."""


def rows_needed(pinned: np.ndarray, ids: np.ndarray) -> int:
    """|ids ∪ pinned|: the rows a layer's cache needs for a token whose set is `ids` (unique), given its
    pinned mask (n_ff,) bool. Counted as a union: hot neurons are in most predicted sets, and a layer
    calibrate keeps dense has every neuron pinned."""
    return int(pinned.sum()) + int((~pinned[ids]).sum())


class NeuronCache:
    def __init__(
        self,
        num_neurons: int,
        bundle_elements: int,
        capacity_rows: int,
        dtype,
        window_tokens: int,
        rows: np.ndarray | None = None,
        kernel_rows: KernelRows | None = None,
        arrival_rows: Callable[[int], np.ndarray] | None = None,
    ):
        """kernel_rows: a quantized store's cache on the CPU holds its neurons only there, in the kernels'
        layouts (flash_io/kernel_rows.py): no row matrix here, inserts go there as read, and a delete moves ids
        only. arrival_rows(k): (k, bundle_elements) rows an insert's bundles land in on their way there (one
        buffer the caches of all layers share; default: this cache's own)."""
        if num_neurons <= 0 or bundle_elements <= 0 or capacity_rows < 0:
            raise ValueError(
                f"num_neurons and bundle_elements must be positive and capacity_rows not negative (0: an uncached "
                f"layer, sparse_policy); got {num_neurons}, {bundle_elements}, {capacity_rows}"
            )
        if window_tokens < 1:
            raise ValueError(f"window_tokens must be >= 1 (the paper uses 4..5), got {window_tokens}")
        # A store dtype name ("bfloat16") maps to what the reader writes (uint16 bits).
        dtype = numpy_dtype_of_store(dtype) if isinstance(dtype, str) else np.dtype(dtype)
        self.kernel_rows = kernel_rows
        if kernel_rows is not None:
            if kernel_rows.capacity < capacity_rows:
                raise ValueError(f"kernel rows of {kernel_rows.capacity} slots for a cache of {capacity_rows} rows")
            rows = None
            self._arrival_rows = arrival_rows or GrowingRows(bundle_elements, dtype)
        elif rows is None:
            rows = np.zeros((capacity_rows, bundle_elements), dtype=dtype)  # (capacity_rows, bundle_elements)
        elif rows.shape != (capacity_rows, bundle_elements) or rows.dtype != dtype:
            raise ValueError(
                f"rows must be a ({capacity_rows}, {bundle_elements}) {dtype} array, got {rows.shape} {rows.dtype}"
            )
        self.num_neurons = num_neurons
        self.bundle_elements = bundle_elements
        self.capacity_rows = capacity_rows
        self.dtype = dtype
        self.window_tokens = window_tokens
        self.rows = rows  # (capacity_rows, bundle_elements); None: the neurons are in kernel_rows
        self.slot_ids = np.full(capacity_rows, -1, dtype=np.int32)  # (capacity_rows,) store id per row
        self.slot_of = np.full(num_neurons, -1, dtype=np.int32)  # (num_neurons,) row per store id
        self.num_rows = 0
        self.pinned = np.zeros(num_neurons, dtype=bool)  # (num_neurons,)
        # Sliding window: the last window_tokens active sets, and per neuron how many of them hold it.
        self._window: deque[np.ndarray] = deque()
        self._window_count = np.zeros(num_neurons, dtype=np.int32)  # (num_neurons,)
        # LRU clock: index of the token being processed; last_used per neuron.
        self._token_index = 0
        self._last_used = np.full(num_neurons, -1, dtype=np.int64)  # (num_neurons,)
        self.hits = 0
        self.misses = 0
        self.inserted = 0
        self.deleted = 0
        self.version = 0

    # ---- ids -----------------------------------------------------------------

    def _check_ids(self, ids: np.ndarray, what: str, sort: bool = False) -> np.ndarray:
        """ids as int64, checked (1-D, in range, unique); sorted too when `sort`."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"{what}: ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.size:
            lowest, highest = int(ids.min()), int(ids.max())
            if lowest < 0 or highest >= self.num_neurons:
                bad = lowest if lowest < 0 else highest
                raise IndexError(f"{what}: neuron id {bad} out of range (0..{self.num_neurons - 1})")
            # strictly increasing (what callers mostly pass) proves it cheaply; else count the distinct ids
            if not (ids[1:] > ids[:-1]).all():
                if union_ids(self.num_neurons, ids).size != ids.size:
                    raise ValueError(f"{what}: ids must be unique")
                if sort:
                    ids = np.sort(ids)
        return ids

    @property
    def cached_ids(self) -> np.ndarray:
        return self.slot_ids[: self.num_rows]  # (num_rows,)

    def window_union(self) -> np.ndarray:
        """Sorted ids used by any of the last window_tokens tokens."""
        return np.flatnonzero(self._window_count > 0)

    def dense_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows[:num_rows] (num_rows, bundle_elements), slot_ids[:num_rows] (num_rows,)): what compute multiplies."""
        if self.rows is None:
            raise ValueError("this cache holds its neurons in the kernels' layouts (kernel_rows), not as rows")
        return self.rows[: self.num_rows], self.slot_ids[: self.num_rows]

    # ---- insert / delete -----------------------------------------------------

    def insert(self, ids: np.ndarray, rows_filler: RowsFiller) -> None:
        """Append the bundles of `ids` (not cached, unique) at rows [num_rows, num_rows + k).

        The filler writes them; the bookkeeping changes only if it succeeds.
        """
        ids = self._check_ids(ids, "insert")
        if ids.size == 0:
            return
        already = ids[self.slot_of[ids] >= 0]
        if already.size:
            raise ValueError(f"insert: neuron {int(already[0])} is already cached (row {int(self.slot_of[already[0]])})")
        start, stop = self.num_rows, self.num_rows + ids.size
        if stop > self.capacity_rows:
            raise CacheCapacityError(
                f"insert of {ids.size} neurons needs {stop} rows but capacity is {self.capacity_rows} "
                f"({self.num_rows} in use); call plan_token() first to make room, or raise capacity_rows"
            )
        if self.kernel_rows is None:
            rows_filler(ids, self.rows[start:stop])
        else:
            arrivals = self._arrival_rows(ids.size)  # (k, bundle_elements)
            rows_filler(ids, arrivals)
            self.kernel_rows.arrive(ids, arrivals)
        self.slot_ids[start:stop] = ids
        self.slot_of[ids] = np.arange(start, stop, dtype=np.int32)
        self.num_rows = stop
        self.inserted += ids.size
        self.version += 1

    def delete(self, ids: np.ndarray) -> None:
        """Remove cached, unpinned `ids`; the last rows move into the freed slots."""
        ids = self._check_ids(ids, "delete")
        if ids.size == 0:
            return
        freed = self.slot_of[ids].astype(np.int64)  # (k,)
        if (freed < 0).any():
            raise ValueError(f"delete: neuron {int(ids[freed < 0][0])} is not cached")
        if self.pinned[ids].any():
            raise ValueError(f"delete: neuron {int(ids[self.pinned[ids]][0])} is pinned; unpin() it first")
        new_num_rows = self.num_rows - ids.size
        holes = np.sort(freed[freed < new_num_rows])  # (m,) freed slots inside the new packed prefix
        tail = np.arange(new_num_rows, self.num_rows)  # (k,) rows that leave the prefix
        leaving = np.zeros(self.num_rows, dtype=bool)  # (num_rows,)
        leaving[freed] = True
        movers = tail[~leaving[tail]]  # (m,) surviving rows to move down
        if self.kernel_rows is not None:
            self.kernel_rows.depart(ids)
        if movers.size:
            if self.rows is not None:
                self.rows[holes] = self.rows[movers]  # holes < new_num_rows <= movers: no overlap
            moved_ids = self.slot_ids[movers]
            self.slot_ids[holes] = moved_ids
            self.slot_of[moved_ids] = holes.astype(np.int32)
        self.slot_of[ids] = -1
        self.slot_ids[new_num_rows : self.num_rows] = -1
        self.num_rows = new_num_rows
        self.deleted += ids.size
        self.version += 1

    # ---- hot neurons ---------------------------------------------------------

    def pin(self, ids: np.ndarray, rows_filler: RowsFiller) -> None:
        """Keep `ids` resident for good (hot neurons); the uncached ones are loaded now, once."""
        ids = self._check_ids(ids, "pin")
        missing = ids[self.slot_of[ids] < 0]
        self.insert(missing, rows_filler)
        self.pinned[ids] = True
        self.version += 1

    def unpin(self, ids: np.ndarray) -> None:
        """Make `ids` evictable again (they stay cached until the window or LRU drops them)."""
        ids = self._check_ids(ids, "unpin")
        self.pinned[ids] = False
        self.version += 1

    # ---- per token -----------------------------------------------------------

    def plan_token(self, active_ids: np.ndarray) -> np.ndarray:
        """The ids of this token's predicted set that are not cached, sorted; room is made for them.

        If they do not fit, the least-recently-used unpinned rows that this token
        does not need are evicted first; if even that is not enough, raises
        CacheCapacityError and changes nothing.
        """
        active = self._check_ids(active_ids, "plan_token", sort=True)  # (a,)
        missing = active[self.slot_of[active] < 0]  # (m,)
        if not self._make_room(missing.size, active):
            pinned_count = int(self.pinned.sum())
            raise CacheCapacityError(
                f"this token needs {self.rows_needed(active)} neurons resident ({active.size} predicted, "
                f"{pinned_count} pinned) but the layer cache holds {self.capacity_rows} rows; raise the neuron cache "
                "capacity (--memory), pin fewer hot neurons or lower the predictor's active set"
            )
        self.hits += active.size - missing.size
        self.misses += missing.size
        self._last_used[active] = self._token_index
        return missing

    def late_misses(self, same_ids: np.ndarray, also_ids: np.ndarray | None = None) -> np.ndarray:
        """What plan_late(same_ids, also_ids) will insert, sorted: every id of the same-layer check's set (and of
        also_ids) not cached, unless they and the pinned neurons outgrow the cache (a batch's union), then the
        lowest ids that fit."""
        same = self._late_ids(same_ids, also_ids, "late_misses")  # (s,)
        missing = same[self.slot_of[same] < 0]  # (m,) never pinned: pinned neurons stay cached
        room = self.capacity_rows - (self.rows_needed(same) - missing.size)
        return missing[: max(0, room)]

    def _late_ids(self, same_ids: np.ndarray, also_ids: np.ndarray | None, caller: str) -> np.ndarray:
        same = self._check_ids(same_ids, caller, sort=True)  # (s,)
        if also_ids is None or not len(also_ids):
            return same
        return union_ids(self.num_neurons, same, self._check_ids(also_ids, caller, sort=True))

    def plan_late(self, same_ids: np.ndarray, also_ids: np.ndarray | None = None) -> np.ndarray:
        """The same-layer check's set for the newest token (policy "read"): joins the token's set in the window,
        and room is made for its uncached ids (returned, sorted; see late_misses). also_ids: neurons compute
        needs resident besides (its sequences' window neurons, evicted since): made room for and kept like
        the set, but not the token's own, so not recorded in the window.

        The check ranks the layer's own input, so it outranks the lookahead: the rows
        it takes come from the least recently used neurons that neither it nor the
        pinned need, which are older tokens' first, then the lookahead's picks that
        the check did not confirm (read for nothing, but the layer needs the room).
        """
        wanted = self._late_ids(same_ids, also_ids, "plan_late")  # (w,)
        insert = self.late_misses(wanted)  # (i,)
        dropped = difference_ids(self.num_neurons, wanted[self.slot_of[wanted] < 0], insert)  # (w-kept,) no room
        kept_all = difference_ids(self.num_neurons, wanted, dropped)  # (k,)
        kept = difference_ids(self.num_neurons, self._check_ids(same_ids, "plan_late", sort=True), dropped)
        newest = self._window[-1] if self._window else np.zeros(0, np.int64)
        added = difference_ids(self.num_neurons, kept, newest)  # (a,) what the check adds to the token's set
        if not self._make_room(insert.size, kept_all):
            raise AssertionError("plan_late: late_misses left no room (a flashllm bug)")
        self.hits += difference_ids(self.num_neurons, kept_all, newest).size - insert.size
        self.misses += insert.size
        self._last_used[kept_all] = self._token_index  # as plan_token stamps the token's first set
        if not self._window:
            self.advance_window(kept)
            return insert
        self._window[-1] = union_ids(self.num_neurons, newest, added)
        self._window_count[added] += 1
        return insert

    def _make_room(self, count: int, needed: np.ndarray) -> bool:
        """Evict least recently used rows, never pinned or `needed` ones, until `count` more rows fit;
        False (nothing evicted) when they cannot."""
        shortfall = self.num_rows + count - self.capacity_rows
        if shortfall <= 0:
            return True
        cached = self.cached_ids.astype(np.int64)  # (num_rows,)
        keep = self.pinned.copy()  # (num_neurons,)
        keep[needed] = True
        evictable = cached[~keep[cached]]
        if evictable.size < shortfall:
            return False
        oldest_first = np.argsort(self._last_used[evictable], kind="stable")
        self.delete(evictable[oldest_first[:shortfall]])
        return True

    def advance_window(self, active_ids: np.ndarray) -> None:
        """Record this token's active set (for a batch, the union over its sequences) in the window."""
        active = self._check_ids(active_ids, "advance_window", sort=True)  # (a,)
        self._window.append(active)
        self._window_count[active] += 1
        if len(self._window) > self.window_tokens:
            self._window_count[self._window.popleft()] -= 1
        self._last_used[active] = self._token_index
        self._token_index += 1

    def rows_needed(self, ids: np.ndarray) -> int:
        """Rows a token whose set is `ids` (unique) needs: its set ∪ the pinned neurons."""
        return rows_needed(self.pinned, ids)

    def evict_outside_window(self) -> np.ndarray:
        """Delete cached neurons that none of the last window_tokens tokens used and that are not pinned; returns them."""
        cached = self.cached_ids.astype(np.int64)  # (num_rows,)
        stale = cached[(self._window_count[cached] == 0) & ~self.pinned[cached]]
        self.delete(stale)
        return stale
