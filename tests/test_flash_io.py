"""Flash I/O: the bundle reader returns exactly the bytes of the store, reads reach the
device, and the neuron cache keeps the sliding window of neurons in a packed matrix."""
from __future__ import annotations

import functools
import os

import numpy as np
import pytest

from flashllm.protocol.store_format import (
    ALIGNMENT_BYTES,
    FFN_FILE,
    FfnLayerRegion,
    FfnLayout,
    align_up,
    sha256_hex,
)
from flashllm.workers.flash_io.bundle_reader import (
    BundleReader,
    GapMerging,
    measure_direct_read_bandwidth,
    numpy_dtype_of_store,
    plan_reads,
)
from flashllm.workers.flash_io.direct_io import (
    ALIGNMENT_SOURCES,
    MEMORY_FILESYSTEMS,
    DirectFile,
    PageCacheBypassWarning,
    aligned_buffer,
    filesystem_type,
    logical_block_size_bytes,
    statx_dio_alignment,
)
from flashllm.workers.flash_io.linux_aio import AioQueue, AioUnavailable
from flashllm.workers.flash_io.neuron_cache import CacheCapacityError, NeuronCache

FIRST_REGION_OFFSET_BYTES = 2 * ALIGNMENT_BYTES  # not 0: regions need not start the file


def write_ffn_store(
    store_dir: str, dtype_name: str, hidden_size: int, layer_neurons: list[int], seed: int = 0
) -> tuple[FfnLayout, list[np.ndarray]]:
    """A synthetic gated ffn.bin (random bundles); returns its layout and each layer's (n, 3d) bundles."""
    rng = np.random.default_rng(seed)
    dtype = numpy_dtype_of_store(dtype_name)
    bundle_parts = [("gate", hidden_size), ("up", hidden_size), ("down", hidden_size)]
    bundle_elements = 3 * hidden_size
    bundle_bytes = bundle_elements * dtype.itemsize
    regions, layers = [], []
    offset_bytes = FIRST_REGION_OFFSET_BYTES
    path = os.path.join(store_dir, FFN_FILE)
    with open(path, "wb") as f:
        f.write(b"\xee" * offset_bytes)  # junk before the first region: a wrong offset shows
        for num_neurons in layer_neurons:
            if dtype == np.uint16:  # bfloat16 bits
                bundles = rng.integers(0, 1 << 16, size=(num_neurons, bundle_elements), dtype=np.uint16)
            else:
                bundles = rng.standard_normal((num_neurons, bundle_elements)).astype(dtype)  # (n, 3d)
            f.seek(offset_bytes)
            f.write(bundles.tobytes())
            regions.append(FfnLayerRegion(offset_bytes, num_neurons * bundle_bytes, num_neurons, sha256_hex(bundles.tobytes())))
            layers.append(bundles)
            end_bytes = offset_bytes + num_neurons * bundle_bytes
            offset_bytes = align_up(end_bytes)
            f.write(b"\xdd" * (offset_bytes - end_bytes))
        # The file ends where the last region ends, unaligned: aligned reads run past EOF.
        f.truncate(end_bytes)
        f.flush()
        os.fsync(f.fileno())
    layout = FfnLayout(
        file=FFN_FILE,
        dtype=dtype_name,
        alignment_bytes=ALIGNMENT_BYTES,
        bundle_parts=bundle_parts,
        bundle_bytes=bundle_bytes,
        file_bytes=end_bytes,
        layers=regions,
    )
    return layout, layers


def aio_available() -> bool:
    try:
        AioQueue(1).close()
        return True
    except AioUnavailable:
        return False


# Both ways of keeping reads in flight must return the same bytes; AIO only where the kernel gives it.
IO_BACKENDS = [pytest.param("threads"),
               pytest.param("aio", marks=pytest.mark.skipif(not aio_available(), reason="no Linux AIO here"))]


def direct_dir(tmp_path) -> str:
    """tmp_path, skipping the test where it cannot be read directly (AIO needs O_DIRECT)."""
    if filesystem_type(str(tmp_path)) in MEMORY_FILESYSTEMS:
        pytest.skip(f"{tmp_path} is on a memory filesystem: no device to read directly")
    return str(tmp_path)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def read_bytes_of_this_process() -> int:
    with open("/proc/self/io", encoding="ascii") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["read_bytes"])


# ---- reading the store ---------------------------------------------------------------


@pytest.mark.parametrize("io_backend", IO_BACKENDS)
@pytest.mark.parametrize("dtype_name,hidden_size", [("float16", 100), ("float32", 100), ("float32", 1000), ("bfloat16", 64)])
def test_read_layer_returns_every_bundle_as_written(tmp_path, dtype_name, hidden_size, io_backend):
    layout, layers = write_ffn_store(direct_dir(tmp_path), dtype_name, hidden_size, [300, 257, 131])
    with BundleReader(str(tmp_path), layout, max_request_bytes=64 * 1024, io_backend=io_backend) as reader:
        assert reader.io_backend == io_backend
        for layer, expected in enumerate(layers):
            got = reader.read_layer(layer)  # (n, 3d)
            assert same_bytes(got, expected)
        assert reader.stats.useful_bytes == layout.total_bundle_bytes
        assert reader.stats.read_bytes >= layout.total_bundle_bytes


@pytest.mark.parametrize("io_backend", IO_BACKENDS)
@pytest.mark.parametrize("dtype_name,hidden_size,max_staging_bytes", [
    ("float16", 100, None), ("float32", 100, None), ("float32", 1000, None), ("float32", 1000, 40 * 1024)])
def test_read_neurons_writes_the_asked_rows_in_the_asked_order(tmp_path, dtype_name, hidden_size, io_backend,
                                                               max_staging_bytes):
    """max_staging_bytes: a read of many neurons goes in rounds that reuse a staging buffer of about that size
    (40 KiB: a few requests each), which is all the reader ever holds for it."""
    layout, layers = write_ffn_store(direct_dir(tmp_path), dtype_name, hidden_size, [300, 257])
    rng = np.random.default_rng(1)
    dtype = numpy_dtype_of_store(dtype_name)
    staging = {} if max_staging_bytes is None else {"max_staging_bytes": max_staging_bytes}
    # queue_depth 4: rounds of up to ~100 requests reuse the AIO slots many times
    with BundleReader(str(tmp_path), layout, num_threads=3, max_gap_bytes=8192, max_request_bytes=32 * 1024,
                      io_backend=io_backend, queue_depth=4, **staging) as reader:
        for layer, expected in enumerate(layers):
            n = len(expected)
            id_sets = [
                np.array([0]),
                np.array([n - 1]),
                np.array([n - 1, 0]),  # both region ends
                np.arange(17, 90),  # a range
                np.arange(n)[::-1].copy(),  # everything, reversed
            ] + [rng.choice(n, size=int(rng.integers(1, n)), replace=False) for _ in range(20)]
            for ids in id_sets:
                out = np.zeros((len(ids) + 3, layout.bundle_elements), dtype=dtype)  # spare rows stay untouched
                reader.read_neurons(layer, ids, out)
                assert same_bytes(out[: len(ids)], expected[ids])
                assert not out[len(ids) :].any()
        if max_staging_bytes is not None:
            assert reader._staging.nbytes <= max_staging_bytes + 32 * 1024 < layout.layers[0].length_bytes // 4


def test_read_neurons_fills_free_rows_of_a_bigger_matrix(tmp_path):
    layout, layers = write_ffn_store(str(tmp_path), "float16", 64, [200])
    matrix = np.zeros((100, layout.bundle_elements), dtype=np.float16)  # like a cache's rows
    with BundleReader(str(tmp_path), layout) as reader:
        reader.read_neurons(0, np.array([5, 150, 7]), matrix[40:43])
    assert same_bytes(matrix[40:43], layers[0][[5, 150, 7]])
    assert not matrix[:40].any() and not matrix[43:].any()


@pytest.mark.parametrize("io_backend", IO_BACKENDS)
@pytest.mark.parametrize("max_staging_bytes", [None, 4096])
def test_a_started_neuron_read_lands_when_finished_and_holds_the_reader_until_then(tmp_path, io_backend,
                                                                                 max_staging_bytes):
    """start_neuron_read puts the reads to the device; the caller works; finish(out) writes the rows. Meanwhile
    no other read may use the queue and staging, a finish runs once, and a bad out still leaves the reader usable
    (also when the read goes in rounds of one request, max_staging_bytes=4096)."""
    layout, layers = write_ffn_store(direct_dir(tmp_path), "float32", 100, [300, 257])
    ids = np.array([3, 4, 5, 90, 200, 201, 299])
    staging = {} if max_staging_bytes is None else {"max_staging_bytes": max_staging_bytes}
    with BundleReader(str(tmp_path), layout, max_gap_bytes=0, io_backend=io_backend, queue_depth=4,
                      **staging) as reader:
        finish = reader.start_neuron_read(0, ids)
        with pytest.raises(RuntimeError, match="still pending"):
            reader.read_neurons(1, np.array([1]), np.zeros((1, layout.bundle_elements), np.float32))
        with pytest.raises(RuntimeError, match="still pending"):
            reader.read_layer(1)
        out = np.zeros((len(ids), layout.bundle_elements), np.float32)
        finish(out)
        assert same_bytes(out, layers[0][ids])
        with pytest.raises(RuntimeError, match="already finished"):
            finish(out)
        finish = reader.start_neuron_read(1, np.array([7, 8, 100, 200]))
        with pytest.raises(ValueError, match="out has 1 rows but 4 neuron ids"):
            finish(np.zeros((1, layout.bundle_elements), np.float32))
        assert same_bytes(reader.read_layer(1), layers[1])  # the failed finish released the reader


def test_read_neurons_rejects_bad_requests_with_clear_errors(tmp_path):
    layout, _ = write_ffn_store(str(tmp_path), "float16", 32, [50, 40])
    out = np.zeros((10, layout.bundle_elements), dtype=np.float16)
    with BundleReader(str(tmp_path), layout) as reader:
        with pytest.raises(ValueError, match="more than once"):
            reader.read_neurons(0, np.array([3, 4, 3]), out)
        with pytest.raises(IndexError, match="neuron id 40 out of range for layer 1"):
            reader.read_neurons(1, np.array([0, 40]), out)
        with pytest.raises(IndexError, match="neuron id -1"):
            reader.read_neurons(0, np.array([-1]), out)
        with pytest.raises(IndexError, match="layer 2 out of range"):
            reader.read_layer(2)
        with pytest.raises(ValueError, match="dtype float32"):
            reader.read_neurons(0, np.array([1]), out.astype(np.float32))
        with pytest.raises(ValueError, match="rows but 11 neuron ids"):
            reader.read_neurons(0, np.arange(11), out)
        reader.read_neurons(0, np.array([], dtype=np.int64), out)  # nothing asked, nothing read
        assert reader.stats.requests == 0
    reader.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        reader.read_layer(0)


def test_truncated_file_is_reported(tmp_path):
    layout, _ = write_ffn_store(str(tmp_path), "float16", 32, [50])
    with open(tmp_path / FFN_FILE, "r+b") as f:
        f.truncate(layout.file_bytes - 10)
    with pytest.raises(Exception, match="truncated"):
        BundleReader(str(tmp_path), layout)


@pytest.mark.parametrize("io_backend", IO_BACKENDS)
def test_a_store_truncated_while_open_is_reported(tmp_path, io_backend):
    """The reads come back short: the reader says the file is truncated instead of returning junk rows."""
    layout, layers = write_ffn_store(direct_dir(tmp_path), "float32", 64, [300, 200])
    with BundleReader(str(tmp_path), layout, io_backend=io_backend) as reader:
        with open(tmp_path / FFN_FILE, "r+b") as f:
            f.truncate(layout.layers[1].offset_bytes + 50 * layout.bundle_bytes)
        out = np.empty((2, layout.bundle_elements), dtype=np.float32)
        reader.read_neurons(1, np.array([3, 40]), out)  # still in the file
        assert same_bytes(out, layers[1][[3, 40]])
        with pytest.raises(EOFError, match="truncated"):
            reader.read_neurons(1, np.array([3, 150]), out)
        with pytest.raises(EOFError, match="truncated"):
            reader.read_layer(1)


def test_counters_equal_the_plan(tmp_path):
    layout, _ = write_ffn_store(str(tmp_path), "float32", 100, [400])
    ids = np.array([3, 4, 5, 100, 101, 250, 399])
    with BundleReader(str(tmp_path), layout, max_gap_bytes=4096, max_request_bytes=64 * 1024) as reader:
        plan = plan_reads(ids, layout.layers[0].offset_bytes, layout.bundle_bytes, reader.alignment_bytes, 4096, 64 * 1024)
        reader.read_neurons(0, ids, np.empty((len(ids), layout.bundle_elements), dtype=np.float32))
        assert reader.stats.requests == len(plan)
        assert reader.stats.read_bytes == sum(request.length_bytes for request in plan)
        assert reader.stats.useful_bytes == len(ids) * layout.bundle_bytes
        assert reader.stats.read_time_s > 0
        reader.reset_stats()
        assert reader.stats.requests == reader.stats.read_bytes == 0


# ---- the read planner ----------------------------------------------------------------


def check_plan(plan, ids, region_offset_bytes, bundle_bytes, alignment_bytes, max_gap_bytes, max_request_bytes,
               byte_bound: bool = False):
    wanted = np.unique(ids)
    covered = []
    for request in plan:
        assert request.offset_bytes % alignment_bytes == 0 and request.length_bytes % alignment_bytes == 0
        inside = wanted[(wanted >= request.first_id) & (wanted <= request.last_id)]
        assert inside[0] == request.first_id and inside[-1] == request.last_id
        for neuron in inside:
            start = region_offset_bytes + int(neuron) * bundle_bytes
            assert request.offset_bytes <= start and start + bundle_bytes <= request.offset_bytes + request.length_bytes
        # Oversize only when one bundle alone needs it.
        assert request.length_bytes <= max(max_request_bytes, align_up(bundle_bytes, alignment_bytes) + alignment_bytes)
        covered.extend(inside.tolist())
    assert covered == wanted.tolist()  # every wanted id once, requests in order
    for before, after in zip(plan, plan[1:]):
        gap_bytes = after.offset_bytes - (before.offset_bytes + before.length_bytes)
        # Neighbours stay apart only when the gap is costly or merging would break the size cap.
        merged_bytes = after.offset_bytes + after.length_bytes - before.offset_bytes
        # (with a byte bound, a cheap gap may also stay unread because the bound is spent)
        assert gap_bytes > max_gap_bytes or merged_bytes > max_request_bytes or byte_bound


def test_plan_reads_invariants_on_random_id_sets():
    rng = np.random.default_rng(2)
    for _ in range(300):
        bundle_bytes = int(rng.choice([600, 1200, 4096, 12000, 24576, 70000]))
        alignment_bytes = int(rng.choice([512, 4096]))
        region_offset_bytes = int(rng.integers(0, 50)) * 4096
        max_gap_bytes = int(rng.choice([0, 4096, 32768]))
        max_request_bytes = int(rng.choice([4096, 65536, 1 << 20]))
        num_neurons = int(rng.integers(1, 3000))
        ids = rng.choice(num_neurons, size=int(rng.integers(1, min(num_neurons, 400) + 1)), replace=False)
        plan = plan_reads(ids, region_offset_bytes, bundle_bytes, alignment_bytes, max_gap_bytes, max_request_bytes,
                          max_read_amplification=None)
        check_plan(plan, ids, region_offset_bytes, bundle_bytes, alignment_bytes, max_gap_bytes, max_request_bytes)


def aligned_union_bytes(ids, region_offset_bytes, bundle_bytes, alignment_bytes) -> int:
    """Bytes of the wanted bundles' aligned spans, each block once: what a read with no gap merged costs."""
    blocks = set()
    for neuron in np.unique(ids).tolist():
        start = region_offset_bytes + neuron * bundle_bytes
        blocks.update(range(start // alignment_bytes, -(-(start + bundle_bytes) // alignment_bytes)))
    return len(blocks) * alignment_bytes


def test_plan_reads_reads_gaps_only_within_the_byte_bound():
    """With a byte bound, a plan reads at most max(bound x wanted bytes, the aligned spans alone), still
    covers every bundle, and never has more requests than the plan that merges no gap."""
    rng = np.random.default_rng(12)
    for _ in range(200):
        bundle_bytes = int(rng.choice([1300, 1536, 3456, 3584, 6912]))
        alignment_bytes = int(rng.choice([512, 4096]))
        num_neurons = int(rng.integers(50, 2000))
        ids = rng.choice(num_neurons, size=int(rng.integers(1, num_neurons // 3 + 2)), replace=False)
        amplification = float(rng.choice([1.0, 1.1, 1.25, 2.0]))
        plan = plan_reads(ids, 4096, bundle_bytes, alignment_bytes, max_gap_bytes=40_000, max_request_bytes=1 << 20,
                          max_read_amplification=amplification)
        check_plan(plan, ids, 4096, bundle_bytes, alignment_bytes, 40_000, 1 << 20, byte_bound=True)
        union_bytes = aligned_union_bytes(ids, 4096, bundle_bytes, alignment_bytes)
        wanted_bytes = len(ids) * bundle_bytes
        read_bytes = sum(request.length_bytes for request in plan)
        assert read_bytes <= max(int(amplification * wanted_bytes), union_bytes)
        unmerged = plan_reads(ids, 4096, bundle_bytes, alignment_bytes, 0, 1 << 20, max_read_amplification=None)
        assert sum(request.length_bytes for request in unmerged) == union_bytes
        assert len(plan) <= len(unmerged)


def test_a_masked_read_keeps_the_byte_bound_for_a_sparse_set_and_merges_by_cost_for_a_dense_one(tmp_path):
    """7B-shaped bundles (6,912 bytes). A sparse set (neurons far apart but for a few close pairs, as a ReLU
    token's): merging by the read cost alone would read ~1.7x its bytes, BOUNDED_UNLESS_SLOWER keeps the byte
    bound, which the cost model puts ~1-3% slower. A dense set (every other neuron): the bound would take
    ~3x the device time in ~60x the requests, so its gaps are merged by cost; BOUNDED keeps the bound anyway."""
    layout, layers = write_ffn_store(str(tmp_path), "float32", 576, [4000])
    pairs = np.arange(1300, 3300, 200)
    sparse = np.sort(np.concatenate([np.arange(0, 1200, 20), pairs, pairs + 6]))  # pairs 5 bundles apart
    dense = np.arange(0, 4000, 2)
    with BundleReader(str(tmp_path), layout) as reader:
        offset, bundle_bytes, alignment = layout.layers[0].offset_bytes, layout.bundle_bytes, reader.alignment_bytes

        def read(ids: np.ndarray, merging: GapMerging) -> tuple[int, int]:
            reader.reset_stats()
            out = np.empty((len(ids), layout.bundle_elements), np.float32)
            reader.read_neurons(0, ids, out, merging)
            assert same_bytes(out, layers[0][ids])
            return reader.stats.read_bytes, reader.stats.requests

        def bound(ids: np.ndarray) -> int:
            return max(int(reader.max_read_amplification * len(ids) * bundle_bytes),
                       aligned_union_bytes(ids, offset, bundle_bytes, alignment))

        by_cost = plan_reads(sparse, offset, bundle_bytes, alignment, reader.max_gap_bytes,
                             max_read_amplification=None)
        assert sum(request.length_bytes for request in by_cost) > 1.3 * bound(sparse)
        read_bytes, _ = read(sparse, GapMerging.BOUNDED_UNLESS_SLOWER)
        assert read_bytes <= bound(sparse)

        read_bytes, requests = read(dense, GapMerging.BOUNDED_UNLESS_SLOWER)
        assert read_bytes > 1.9 * len(dense) * bundle_bytes and requests < 40
        read_bytes, requests = read(dense, GapMerging.BOUNDED)
        assert read_bytes <= bound(dense) and requests > 1000


def test_spans_read_touching_are_the_requests_of_the_read_they_come_from(tmp_path):
    """span_ids gives every neuron a read's requests cover; reading those with GapMerging.TOUCHING makes the
    same requests, for a set whose read keeps the byte bound and one merged by cost."""
    layout, layers = write_ffn_store(str(tmp_path), "float32", 576, [4000])
    pairs = np.arange(1300, 3300, 200)
    with BundleReader(str(tmp_path), layout) as reader:
        for ids in (np.sort(np.concatenate([np.arange(0, 1200, 20), pairs, pairs + 6])), np.arange(0, 4000, 2)):
            reader.reset_stats()
            reader.read_neurons(0, ids, np.empty((len(ids), layout.bundle_elements), np.float32),
                                GapMerging.BOUNDED_UNLESS_SLOWER)
            planned = (reader.stats.read_bytes, reader.stats.requests)
            covered = reader.span_ids(0, ids, GapMerging.BOUNDED_UNLESS_SLOWER)
            assert set(ids.tolist()) <= set(covered.tolist()) and np.all(np.diff(covered) > 0)
            reader.reset_stats()
            out = np.empty((len(covered), layout.bundle_elements), np.float32)
            reader.read_neurons(0, covered, out, GapMerging.TOUCHING)
            assert (reader.stats.read_bytes, reader.stats.requests) == planned
            assert same_bytes(out, layers[0][covered])


def test_plan_reads_merges_the_smallest_gaps_first():
    # 1 KiB bundles at 512 B alignment: ids 0, 2 (gap 1 KiB), 10 (gap 7 KiB), 13 (gap 2 KiB): 4 KiB wanted
    ids = np.array([0, 2, 10, 13])
    plan = plan_reads(ids, 0, 1024, 512, max_gap_bytes=8192, max_request_bytes=1 << 20, max_read_amplification=1.75)
    # 4 KiB wanted, 7 KiB allowed: the 1 and 2 KiB gaps fit, the 7 KiB one does not
    assert plan == [(0, 3072, 0, 2), (10240, 4096, 10, 13)]
    everything = plan_reads(ids, 0, 1024, 512, max_gap_bytes=8192, max_request_bytes=1 << 20,
                            max_read_amplification=None)
    assert everything == [(0, 14336, 0, 13)]


def test_a_float16_bundle_at_512_byte_alignment_costs_one_block_more_at_most():
    """A 3,456-byte float16 bundle (d=576) read alone costs 3,584 or 4,096 bytes at 512 B alignment, where
    4 KiB alignment rounds it out to 8,192 half the time."""
    costs_512 = {plan_reads(np.array([neuron]), 0, 3456, 512)[0].length_bytes for neuron in range(64)}
    assert costs_512 == {3584, 4096}
    costs_4096 = {plan_reads(np.array([neuron]), 0, 3456, 4096)[0].length_bytes for neuron in range(64)}
    assert costs_4096 == {4096, 8192}
    assert plan_reads(np.array([1]), 0, 3456, 512) == [(3072, 4096, 1, 1)]  # bytes 3456..6912


def test_plan_reads_coalesces_near_ids_and_splits_far_ones():
    # 1 KiB bundles in a region at 8 KiB: ids 0..3 share block 2, id 10 is one block further.
    near = plan_reads(np.array([3, 0, 10]), 8192, 1024, 4096, max_gap_bytes=4096, max_request_bytes=1 << 20,
                      max_read_amplification=None)
    assert near == [(8192, 12288, 0, 10)]
    far = plan_reads(np.array([3, 0, 10]), 8192, 1024, 4096, max_gap_bytes=0, max_request_bytes=1 << 20)
    assert far == [(8192, 4096, 0, 3), (16384, 4096, 10, 10)]
    capped = plan_reads(np.arange(64), 0, 1024, 4096, max_gap_bytes=1 << 20, max_request_bytes=16384)
    assert [request.length_bytes for request in capped] == [16384] * 4
    assert plan_reads(np.array([], dtype=np.int64), 0, 1024) == []


# ---- page cache: fallback and honest device reads -------------------------------------


@pytest.fixture
def shm_dir():
    """A directory on tmpfs (/dev/shm), removed afterwards; skips where there is none."""
    if not os.path.isdir("/dev/shm") or filesystem_type("/dev/shm") not in MEMORY_FILESYSTEMS:
        pytest.skip("no tmpfs at /dev/shm")
    path = os.path.join("/dev/shm", f"flashllm-test-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    finally:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)


def test_memory_filesystem_falls_back_to_buffered_reads_and_warns(shm_dir):
    layout, layers = write_ffn_store(shm_dir, "float16", 48, [120, 80])
    with pytest.warns(PageCacheBypassWarning, match="only dropped, not bypassed"):
        reader = BundleReader(shm_dir, layout)
    with reader:
        assert not reader.direct
        assert reader.io_backend == "threads" and "buffered" in reader.io_backend_note
        assert same_bytes(reader.read_layer(1), layers[1])
        ids = np.array([119, 0, 60])
        out = np.empty((3, layout.bundle_elements), dtype=np.float16)
        reader.read_neurons(0, ids, out)
        assert same_bytes(out, layers[0][ids])


def test_asking_for_aio_where_reads_are_buffered_is_refused(shm_dir):
    layout, _ = write_ffn_store(shm_dir, "float16", 48, [40])
    with pytest.warns(PageCacheBypassWarning), pytest.raises(RuntimeError, match="AIO.*io_backend='threads'"):
        BundleReader(shm_dir, layout, io_backend="aio")
    with pytest.raises(ValueError, match="io_backend"):
        BundleReader(shm_dir, layout, io_backend="uring")


@pytest.mark.skipif(not aio_available(), reason="no Linux AIO here")
def test_aio_queue_reads_every_request_into_its_buffer(tmp_path):
    """More requests than slots, in any order: each lands where it was asked; on_complete sees each once."""
    path = os.path.join(direct_dir(tmp_path), "data.bin")
    content = np.random.default_rng(5).integers(0, 256, size=64 * 4096, dtype=np.uint8)
    content.tofile(path)
    rng = np.random.default_rng(6)
    blocks = rng.choice(63, size=40)  # (40,) repeats allowed
    lengths = 4096 * rng.integers(1, 3, size=40)  # (40,) 4 or 8 KiB
    buffer = aligned_buffer(40 * 8192)
    completed = []
    with DirectFile(path) as file, AioQueue(depth=3) as queue:
        assert file.direct
        queue.read_all(file.fileno(), blocks * 4096, lengths, buffer.ctypes.data + 8192 * np.arange(40, dtype=np.uint64),
                       on_complete=lambda index, got: completed.append((index, got)))
    assert sorted(completed) == [(i, int(lengths[i])) for i in range(40)]
    for i in range(40):
        start = int(blocks[i]) * 4096
        assert same_bytes(buffer[8192 * i : 8192 * i + lengths[i]], content[start : start + lengths[i]])


@pytest.mark.skipif(not aio_available(), reason="no Linux AIO here")
def test_aio_queue_raises_the_first_error_after_every_read_finished(tmp_path):
    path = os.path.join(direct_dir(tmp_path), "data.bin")
    np.zeros(16 * 4096, dtype=np.uint8).tofile(path)
    buffer = aligned_buffer(8 * 4096)
    addresses = buffer.ctypes.data + 4096 * np.arange(8, dtype=np.uint64)
    completed = []
    with DirectFile(path) as file, AioQueue(depth=8) as queue:
        offsets = 4096 * np.arange(8)
        offsets[3] = 100  # not block aligned: O_DIRECT refuses it
        with pytest.raises(OSError, match="offset 100"):
            queue.read_all(file.fileno(), offsets, np.full(8, 4096), addresses,
                           on_complete=lambda index, got: completed.append(index))
        assert 3 not in completed

        def fail_on_second(index: int, got: int) -> None:
            if index == 1:
                raise KeyError("caller's error")
        with pytest.raises(KeyError, match="caller's error"):
            queue.read_all(file.fileno(), 4096 * np.arange(8), np.full(8, 4096), addresses, on_complete=fail_on_second)
        queue.read_all(file.fileno(), [0], [4096], addresses[:1], on_complete=lambda index, got: None)  # still usable
    queue.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        queue.read_all(0, [0], [4096], addresses[:1], on_complete=lambda index, got: None)


def test_aligned_buffers_are_page_aligned():
    for size_bytes in (1, 4096, 100_000):
        buffer = aligned_buffer(size_bytes)  # (size_bytes,)
        assert buffer.ctypes.data % 4096 == 0 and buffer.nbytes == size_bytes and buffer.flags.writeable


@pytest.mark.parametrize("io_backend", IO_BACKENDS)
def test_neuron_reads_reach_the_device(tmp_path, io_backend):
    """/proc/self/io read_bytes grows by the planned bytes: the page cache did not serve them."""
    if filesystem_type(str(tmp_path)) in MEMORY_FILESYSTEMS:
        pytest.skip(f"{tmp_path} is on a memory filesystem: no device to read")
    layout, layers = write_ffn_store(str(tmp_path), "float32", 256, [4000])  # 3 KiB bundles, ~12 MB
    path = os.path.join(str(tmp_path), FFN_FILE)
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    with DirectFile(path) as probe:
        if not probe.direct:
            pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT: {probe.fallback_reason}")
    rng = np.random.default_rng(3)
    ids = rng.choice(4000, size=300, replace=False)
    out = np.empty((300, layout.bundle_elements), dtype=np.float32)
    with BundleReader(str(tmp_path), layout, max_gap_bytes=8192, io_backend=io_backend) as reader:
        assert reader.direct
        before_bytes = read_bytes_of_this_process()
        reader.read_neurons(0, ids, out)
        device_bytes = read_bytes_of_this_process() - before_bytes
        planned_bytes = reader.stats.read_bytes
        assert same_bytes(out, layers[0][ids])
        assert planned_bytes >= reader.stats.useful_bytes
        # Exact up to unrelated reads of this process in the same window (imports, pytest).
        assert planned_bytes <= device_bytes <= planned_bytes + 1024 * 1024, (device_bytes, planned_bytes)
        # Reading the same rows again goes to the device again: nothing was cached.
        before_bytes = read_bytes_of_this_process()
        reader.read_neurons(0, ids, out)
        assert read_bytes_of_this_process() - before_bytes >= planned_bytes


def direct_file_or_skip(path: str, **options) -> DirectFile:
    file = DirectFile(path, **options)
    if not file.direct:
        file.close()
        pytest.skip(f"{path} cannot be read directly: {file.fallback_reason}")
    return file


@pytest.mark.parametrize("source", ALIGNMENT_SOURCES)
def test_each_way_of_finding_the_direct_io_alignment_agrees_with_what_the_device_accepts(tmp_path, source):
    """statx, the block device and the probe each give an alignment at which O_DIRECT reads succeed, and
    none larger than the smallest one the probe finds accepted (no 4 KiB assumption on a 512 B disk)."""
    path = os.path.join(direct_dir(tmp_path), "data.bin")
    content = np.random.default_rng(7).integers(0, 256, size=256 * 1024, dtype=np.uint8)
    content.tofile(path)
    if source == "statx" and statx_dio_alignment(path) is None:
        pytest.skip("this kernel or libc gives no STATX_DIOALIGN (Linux < 6.1)")
    if source == "block_device" and logical_block_size_bytes(path) is None:
        pytest.skip(f"sysfs does not tell the logical block size of {tmp_path}'s device")
    with direct_file_or_skip(path, alignment_sources=("probe",)) as smallest, \
            direct_file_or_skip(path, alignment_sources=(source,)) as file:
        assert smallest.alignment.source == "probe"
        assert file.alignment.source == source
        assert file.alignment_bytes == smallest.alignment_bytes  # all three agree on this machine's disks
        alignment = file.alignment_bytes
        buffer = aligned_buffer(4 * alignment + 4096)
        for block in (1, 3, 17):
            view = buffer[alignment : 3 * alignment]  # an address aligned to exactly `alignment`
            got = file.read_into(block * alignment, view)
            assert got == 2 * alignment and same_bytes(view, content[block * alignment : (block + 2) * alignment])
        if alignment > 1:
            with pytest.raises(ValueError, match=f"not aligned to {alignment} bytes"):
                file.read_into(alignment // 2, buffer[:alignment])


def test_the_probe_refuses_what_the_device_refuses(tmp_path):
    """Half the discovered alignment is refused by O_DIRECT (EINVAL): the probe found the smallest."""
    path = os.path.join(direct_dir(tmp_path), "data.bin")
    np.zeros(64 * 1024, dtype=np.uint8).tofile(path)
    with direct_file_or_skip(path, alignment_sources=("probe",)) as file:
        alignment = file.alignment_bytes
        if alignment <= 512:
            return  # 512 is the smallest block a device has: nothing smaller to refuse
        buffer = aligned_buffer(4 * alignment)
        with pytest.raises(OSError):
            os.preadv(file.fileno(), [memoryview(buffer)[alignment // 2 : alignment]], alignment // 2)


@pytest.mark.parametrize("io_backend", IO_BACKENDS)
@pytest.mark.parametrize("source", ALIGNMENT_SOURCES)
def test_neuron_reads_at_the_discovered_alignment_return_the_stored_rows(tmp_path, source, io_backend):
    """Demo-shaped float16 bundles (3,456 bytes, not a multiple of any block) read with O_DIRECT at the
    alignment each source gives: the rows are the stored ones, and no request is longer than its bundles'
    aligned span."""
    layout, layers = write_ffn_store(direct_dir(tmp_path), "float16", 576, [700, 300])
    rng = np.random.default_rng(8)
    with BundleReader(str(tmp_path), layout, io_backend=io_backend, alignment_sources=(source,)) as reader:
        if not reader.direct:
            pytest.skip("no direct reads here")
        assert reader._file.alignment.source == source
        for layer, expected in enumerate(layers):
            for size in (1, 5, 40, len(expected) // 2):
                ids = rng.choice(len(expected), size=size, replace=False)
                out = np.empty((size, layout.bundle_elements), dtype=np.float16)
                reader.reset_stats()
                reader.read_neurons(layer, ids, out)
                assert same_bytes(out, expected[ids])
                # at most one partial block at each end of each bundle run
                assert reader.stats.read_bytes <= reader.stats.useful_bytes * 1.2 + 2 * reader.alignment_bytes * size
            assert same_bytes(reader.read_layer(layer), expected)


def cold_read_bytes(path: str) -> None:
    """Write back and drop the file's cached pages, so what is read next comes from the device."""
    os.sync()
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


@pytest.mark.parametrize("io_backend", IO_BACKENDS)
def test_a_scattered_read_of_demo_shaped_float16_bundles_costs_the_device_at_most_1_25x_their_bytes(tmp_path,
                                                                                                    io_backend):
    """The demo model's float16 store shape (d=576: 3,456-byte bundles, 1536 per layer), a token-like
    scattered set per layer (a few percent of neurons, some neighbours), default reader settings, cold cache:
    /proc/self/io read_bytes <= 1.25x the wanted bundles' bytes (4 KiB alignment read ~2.3x)."""
    if filesystem_type(str(tmp_path)) in MEMORY_FILESYSTEMS:
        pytest.skip(f"{tmp_path} is on a memory filesystem: no device to read")
    layout, layers = write_ffn_store(str(tmp_path), "float16", 576, [1536, 1536, 1536])
    cold_read_bytes(os.path.join(str(tmp_path), FFN_FILE))
    rng = np.random.default_rng(9)
    with BundleReader(str(tmp_path), layout, io_backend=io_backend) as reader:
        if not reader.direct:
            pytest.skip(f"no direct reads here: {reader._file.fallback_reason}")
        if reader.alignment_bytes > 512:
            pytest.skip(f"this disk needs {reader.alignment_bytes}-byte direct reads; the bound is for 512 B blocks")
        wanted_bytes = device_bytes = 0
        for layer, expected in enumerate(layers):
            for fraction in (0.02, 0.05, 0.15):
                ids = rng.choice(1536, size=int(fraction * 1536), replace=False)
                out = np.empty((len(ids), layout.bundle_elements), dtype=np.float16)
                before_bytes = read_bytes_of_this_process()
                reader.read_neurons(layer, ids, out)
                device_bytes += read_bytes_of_this_process() - before_bytes
                wanted_bytes += len(ids) * layout.bundle_bytes
                assert same_bytes(out, expected[ids])
        assert reader.stats.read_bytes <= device_bytes  # the device saw at least the plan: nothing came cached
        assert device_bytes <= 1.25 * wanted_bytes, (device_bytes, wanted_bytes)


@pytest.mark.parametrize("io_backend", IO_BACKENDS)
def test_raw_bandwidth_baseline_runs(tmp_path, io_backend):
    write_ffn_store(direct_dir(tmp_path), "float32", 256, [2000])
    bytes_per_s = measure_direct_read_bandwidth(str(tmp_path / FFN_FILE), 65536, 2, 2 * 1024 * 1024,
                                                io_backend=io_backend)
    assert bytes_per_s > 0


def test_bench_read_baseline_alternates_raw_and_reader_runs(tiny_stores):
    """The bench's reader-vs-raw table: per request size the medians of alternating runs of both."""
    from flashllm.runtime.tools.bench import read_size_baseline

    rows = read_size_baseline(tiny_stores("llama"), threads=2, total_bytes=1 << 20, repeats=3)
    assert len(rows) >= 2 and rows[0]["request_bytes"] < rows[1]["request_bytes"]
    for row in rows:
        assert len(row["raw_runs_bytes_per_s"]) == len(row["reader_runs_bytes_per_s"]) == 3
        assert row["raw_bytes_per_s"] == sorted(row["raw_runs_bytes_per_s"])[1]
        assert row["reader_fraction_of_raw"] == pytest.approx(row["reader_bytes_per_s"] / row["raw_bytes_per_s"])
        # raw reads use the reader's mean request, aligned up
        assert row["request_bytes"] - 4096 < row["reader_mean_request_bytes"] <= row["request_bytes"]


# ---- the neuron cache ----------------------------------------------------------------


def check_cache_invariants(cache: NeuronCache, store: np.ndarray) -> None:
    rows, slot_ids = cache.dense_rows()  # (n, e), (n,)
    n = cache.num_rows
    assert rows.shape == (n, cache.bundle_elements) and len(slot_ids) == n
    assert same_bytes(rows, store[slot_ids])  # every cached row is the bundle its slot claims
    assert np.array_equal(cache.slot_of[slot_ids], np.arange(n))  # slot_of and slot_ids are inverse
    assert (cache.slot_of >= 0).sum() == n and (cache.slot_ids[n:] == -1).all()
    assert (cache.slot_of[cache.pinned] >= 0).all()  # pinned stay


def test_cache_insert_and_delete_keep_a_packed_matrix():
    store = np.arange(20 * 4, dtype=np.float32).reshape(20, 4)  # (20, 4)
    fill = lambda ids, out: np.copyto(out, store[ids])  # noqa: E731
    cache = NeuronCache(20, 4, capacity_rows=8, dtype=np.float32, window_tokens=2)
    cache.insert(np.array([7, 2, 11, 5, 9]), fill)
    assert cache.cached_ids.tolist() == [7, 2, 11, 5, 9]
    version = cache.version
    cache.delete(np.array([2, 9]))  # row 1 freed; row 3 (id 5) moves into it
    assert cache.cached_ids.tolist() == [7, 5, 11] and cache.version > version
    check_cache_invariants(cache, store)
    with pytest.raises(ValueError, match="already cached"):
        cache.insert(np.array([7]), fill)
    with pytest.raises(ValueError, match="not cached"):
        cache.delete(np.array([2]))
    with pytest.raises(CacheCapacityError, match="capacity is 8"):
        cache.insert(np.arange(12, 18), fill)
    assert (cache.inserted, cache.deleted) == (5, 2)


def test_cache_window_keeps_exactly_the_last_tokens_union(tmp_path):
    layout, layers = write_ffn_store(str(tmp_path), "float16", 16, [500])
    rng = np.random.default_rng(4)
    window_tokens = 4
    with BundleReader(str(tmp_path), layout) as reader:
        fill = functools.partial(reader.read_neurons, 0)
        cache = NeuronCache(500, layout.bundle_elements, capacity_rows=500, dtype="float16", window_tokens=window_tokens)
        hot = np.array([1, 2, 3, 499])
        cache.pin(hot, fill)
        history = []
        for _ in range(60):
            active = rng.choice(500, size=int(rng.integers(0, 60)), replace=False)
            history.append(set(active.tolist()))
            cache.advance_window(active)
            cache.evict_outside_window()
            missing = cache.plan_token(active)
            cache.insert(missing, fill)
            union = set().union(*history[-window_tokens:]) | set(hot.tolist())
            assert set(cache.cached_ids.tolist()) == union
            check_cache_invariants(cache, layers[0])


def test_cache_random_steps_property(tmp_path):
    """A few hundred random plan/insert/delete/window/pin steps keep every invariant."""
    layout, layers = write_ffn_store(str(tmp_path), "float32", 8, [300])
    store = layers[0]
    rng = np.random.default_rng(5)
    with BundleReader(str(tmp_path), layout, max_gap_bytes=int(rng.choice([0, 4096]))) as reader:
        fill = functools.partial(reader.read_neurons, 0)
        cache = NeuronCache(300, layout.bundle_elements, capacity_rows=120, dtype=np.float32, window_tokens=3)
        for _ in range(400):
            step = rng.choice(["token", "late", "insert", "delete", "pin", "unpin", "evict"],
                              p=[0.35, 0.15, 0.1, 0.1, 0.05, 0.05, 0.2])
            version = cache.version
            cached = cache.cached_ids.astype(np.int64)
            if step == "token":
                active = rng.choice(300, size=int(rng.integers(0, 90)), replace=False)
                cache.advance_window(active)
                try:
                    missing = cache.plan_token(active)
                except CacheCapacityError:
                    assert len(np.union1d(active, np.flatnonzero(cache.pinned))) > cache.capacity_rows
                    continue
                assert not np.isin(missing, cached[np.isin(cached, active)]).any()
                cache.insert(missing, fill)
                assert (cache.slot_of[active] >= 0).all()  # the token has all it needs
            elif step == "late":  # a same-layer check's set for the newest token
                same = rng.choice(300, size=int(rng.integers(0, 130)), replace=False)
                newest = set(cache._window[-1].tolist()) if cache._window else set()
                pinned_before = np.flatnonzero(cache.pinned)
                kept_cached = same[cache.slot_of[same] >= 0]
                insert = cache.plan_late(same)
                cache.insert(insert, fill)
                # what it read was missing; it is all cached now, with what it found, and the pinned stayed
                assert not np.isin(insert, cached).any() and (cache.slot_of[insert] >= 0).all()
                assert (cache.slot_of[kept_cached] >= 0).all() and (cache.slot_of[pinned_before] >= 0).all()
                cut = np.setdiff1d(same[~np.isin(same, cached)], insert)
                assert not cut.size or len(np.union1d(same, pinned_before)) > cache.capacity_rows
                assert newest | set(np.setdiff1d(same, cut).tolist()) == set(cache._window[-1].tolist())
            elif step == "insert":
                free = np.flatnonzero(cache.slot_of < 0)
                k = min(int(rng.integers(1, 20)), cache.capacity_rows - cache.num_rows, len(free))
                cache.insert(rng.choice(free, size=k, replace=False), fill)
            elif step == "delete":
                evictable = cached[~cache.pinned[cached]]
                k = min(int(rng.integers(1, 20)), len(evictable))
                cache.delete(rng.choice(evictable, size=k, replace=False))
            elif step == "pin" and cache.num_rows < cache.capacity_rows - 10:
                cache.pin(rng.choice(300, size=3, replace=False), fill)
            elif step == "unpin":
                cache.unpin(np.flatnonzero(cache.pinned)[:2])
            elif step == "evict":
                stale = cache.evict_outside_window()
                assert not np.isin(stale, cache.window_union()).any()
                assert not np.isin(cache.cached_ids, stale).any()
            assert cache.version >= version
            check_cache_invariants(cache, store)
        assert cache.hits + cache.misses > 0 and cache.inserted >= cache.deleted


def test_cache_evicts_least_recently_used_when_a_token_does_not_fit():
    store = np.arange(50 * 2, dtype=np.float16).reshape(50, 2)  # (50, 2)
    fill = lambda ids, out: np.copyto(out, store[ids])  # noqa: E731
    cache = NeuronCache(50, 2, capacity_rows=10, dtype=np.float16, window_tokens=5)
    cache.pin(np.array([49]), fill)
    for active in (np.arange(0, 4), np.arange(10, 14)):
        cache.advance_window(active)
        cache.insert(cache.plan_token(active), fill)
    assert cache.num_rows == 9
    active = np.arange(20, 23)
    cache.advance_window(active)
    cache.insert(cache.plan_token(active), fill)  # the window wants 11 + 1 pinned: the two oldest (0, 1) go
    assert cache.num_rows == 10 and cache.slot_of[[0, 1]].tolist() == [-1, -1]
    active = np.array([30, 31, 10])
    cache.advance_window(active)
    missing = cache.plan_token(active)  # 2 more rows: next oldest (2, 3) go; 10 is needed, 49 pinned
    assert missing.tolist() == [30, 31]
    assert cache.slot_of[[2, 3]].tolist() == [-1, -1] and cache.slot_of[[10, 49]].min() >= 0
    cache.insert(missing, fill)
    check_cache_invariants(cache, store)
    assert cache.hits == 1 and cache.misses == 13
    with pytest.raises(CacheCapacityError, match="needs 11 neurons resident .* holds 10 rows"):
        cache.plan_token(np.arange(35, 45))
    check_cache_invariants(cache, store)


def test_cache_rows_can_live_in_caller_memory():
    shared = np.zeros((6, 3), dtype=np.float32)  # e.g. a view over a /dev/shm mapping
    cache = NeuronCache(10, 3, capacity_rows=6, dtype=np.float32, window_tokens=2, rows=shared)
    cache.insert(np.array([4]), lambda ids, out: out.fill(1.0))
    assert shared[0].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"\(6, 3\) float32"):
        NeuronCache(10, 3, capacity_rows=6, dtype=np.float16, window_tokens=2, rows=shared)


def test_neuron_id_set_operations_match_numpy():
    from flashllm.workers.flash_io.neuron_ids import difference_ids, union_ids

    rng = np.random.default_rng(11)
    for _ in range(50):
        a, b = rng.integers(0, 300, size=int(rng.integers(0, 200))), rng.integers(0, 300, size=int(rng.integers(0, 200)))
        assert np.array_equal(union_ids(300, a, b), np.union1d(a, b))
        assert np.array_equal(union_ids(300, a), np.unique(a))
        sorted_a = np.unique(a)
        assert np.array_equal(difference_ids(300, sorted_a, b), np.setdiff1d(sorted_a, b))


def test_a_whole_layer_read_is_checked_after_its_first_read_by_one_digest(tiny_stores, tmp_path):
    """A layer that read clean once is checked by a single digest over it afterwards; a byte flipped on flash
    since then still fails the next read, with the neuron named."""
    import shutil

    from flashllm.protocol.store_format import read_manifest
    from flashllm.workers.flash_io.bundle_reader import BundleReader
    from flashllm.workers.flash_io.integrity import BundleChecksumError

    store = str(tmp_path / "store")
    shutil.copytree(tiny_stores("llama"), store)
    manifest = read_manifest(store)
    layout = manifest.ffn
    with BundleReader(store, layout) as reader:
        first = reader.read_layer(1).copy()
        assert np.array_equal(reader.read_layer(1), first)  # the second read passes its layer digest
        region = layout.layers[1]
        position = 3
        with open(os.path.join(store, layout.file), "r+b") as f:
            offset = region.offset_bytes + position * layout.bundle_bytes + 7
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x10]))
        with pytest.raises(BundleChecksumError, match=r"layer 1 neuron \d+ \(store position 3\)"):
            reader.read_layer(1)
