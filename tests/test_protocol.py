"""The internal protocol: every message survives the codec, versions are checked, shared memory round-trips."""
from __future__ import annotations

import dataclasses
import os

import msgpack
import numpy as np
import pytest

from flashllm.protocol import codec
from flashllm.protocol.endpoints import (
    MAX_IPC_PATH_BYTES, EndpointPathTooLong, InstanceDir, endpoint, instance_alive, new_instance_id,
    stale_instance_dirs,
)
from flashllm.protocol.messages import (
    MESSAGE_TYPES, PATH_CACHED, PATH_MASKED, PROTOCOL_VERSION, ChunkDone, Dispatcher, FfnInput, ForwardChunk,
    ForwardRequest,
    LayerReady, LayerStaged, Lookahead, LogitsTaken, Prediction, PredictionStats, Shutdown, StepBegin, StepFailed,
    UnexpectedMessageError, WorkerFailed, WorkerReady,
)
from flashllm.protocol.shm import (
    SharedMemoryError, SharedSegment, cache_layer_arrays, exchange_layout, list_segments, neuron_cache_layout,
    parse_segment_name, segment_path,
)

ids = np.array([3, 1, 4, 1000], dtype=np.int64)

EXAMPLES = [
    WorkerReady(role="prefetch", pid=123, info={"direct_reads": True}),
    WorkerFailed(role="compute", pid=7, error="OSError: disk gone", traceback="Traceback ..."),
    Shutdown(reason="bye"),
    ForwardRequest(step=5, batch=2, steps=1, token_ids=np.array([10, 11]), slots=np.array([0, 3]),
                   positions=np.array([17, 4])),
    ForwardChunk(step=5, first_row=0, num_rows=2, total_rows=2, vocab=49152, stats={"io_s": 0.25, "cache_hits": 3}),
    LogitsTaken(step=5, next_row=64),
    StepFailed(step=5, role="predictor", error="ValueError: bad"),
    StepBegin(step=6, batch=1, steps=12),
    FfnInput(step=6, layer=3, num_tokens=12, buffer=1),
    Lookahead(step=6, layer=4, ids=ids, commit=True, ready=True),
    Prediction(step=6, layer=3, path=PATH_CACHED, first=ids, same=np.array([7], np.int32), first_committed=True),
    Prediction(step=6, layer=3, path=PATH_MASKED),
    PredictionStats(step=6, layer=3, predicted=810, predict_s=1e-4),
    LayerReady(step=6, layer=3, path=PATH_CACHED, version=42, num_rows=800, hits=700, read_neurons=100,
               read_bytes=690_000, io_s=0.001, critical_io_s=0.0005),
    LayerReady(step=6, layer=3, path=PATH_MASKED, num_rows=606, staging=1, chunk=2, num_chunks=3, read_neurons=606,
               read_bytes=4_190_208, io_s=0.004),
    LayerStaged(step=7, layer=5, staging=0, ids=ids, read_bytes=2_662_400, io_s=0.008),
    ChunkDone(step=6, staging=1),
]


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(a, b)
    return a == b


def test_every_message_type_has_an_example():
    assert {type(m) for m in EXAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_codec_round_trip(msg):
    back = codec.decode(codec.encode(msg))
    assert type(back) is type(msg)
    for f in dataclasses.fields(msg):
        assert _same(getattr(back, f.name), getattr(msg, f.name)), f.name


def test_id_arrays_keep_their_dtype_and_stay_compact():
    frame = codec.encode(Lookahead(step=1, layer=2, ids=np.arange(1000, dtype=np.int32)))
    assert len(frame) < 4100  # 4 bytes per id, not a msgpack int each
    back = codec.decode(frame)
    assert back.ids.dtype == np.int32 and np.array_equal(back.ids, np.arange(1000))


def test_tensors_are_refused_in_messages():
    with pytest.raises(TypeError, match="shared memory"):
        codec.encode(Lookahead(step=1, layer=2, ids=np.zeros(4, dtype=np.float32)))
    with pytest.raises(TypeError, match="shared memory"):
        codec.encode(Lookahead(step=1, layer=2, ids=np.zeros((2, 2), dtype=np.int64)))


def test_version_mismatch_is_a_clear_error():
    frame = msgpack.packb([PROTOCOL_VERSION + 1, Shutdown.tag, "x"])
    with pytest.raises(codec.ProtocolVersionError, match="same install"):
        codec.decode(frame)


def test_malformed_frames_are_codec_errors():
    with pytest.raises(codec.CodecError):
        codec.decode(b"\xc1garbage")
    with pytest.raises(codec.CodecError, match="unknown message tag"):
        codec.decode(msgpack.packb([PROTOCOL_VERSION, 250]))
    with pytest.raises(codec.CodecError, match="fields"):
        codec.decode(msgpack.packb([PROTOCOL_VERSION, FfnInput.tag, 1, 2]))


def test_dispatch_by_type_table():
    seen = []
    dispatcher = Dispatcher({FfnInput: seen.append, StepBegin: lambda m: seen.append(("begin", m.step))})
    dispatcher.dispatch(StepBegin(step=1, batch=1, steps=1))
    dispatcher.dispatch(FfnInput(step=1, layer=0, num_tokens=1, buffer=0))
    assert seen[0] == ("begin", 1) and type(seen[1]) is FfnInput
    with pytest.raises(UnexpectedMessageError, match="Shutdown"):
        dispatcher.dispatch(Shutdown())
    with pytest.raises(TypeError):
        Dispatcher({int: print})


# ---------------------------------------------------------------------- shared memory


@pytest.fixture
def instance():
    name = new_instance_id()
    yield name
    for owner, path in list_segments():
        if owner == name:
            os.unlink(path)


def test_cache_layout_round_trip_between_owner_and_attacher(instance):
    layout = neuron_cache_layout([5, 3], bundle_elements=6, dtype=np.float32)
    owner = SharedSegment.create(instance, layout)
    try:
        rows, slot_ids, header = cache_layer_arrays(owner, 1)
        assert rows.shape == (3, 6) and slot_ids.shape == (3,) and header.shape == (2,)
        rows[:] = np.arange(18, dtype=np.float32).reshape(3, 6)
        slot_ids[:] = [9, 2, -1]
        header[:] = (2, 17)
        for spec in layout.arrays:
            assert spec.offset_bytes % 4096 == 0  # O_DIRECT may read into any array
        other = SharedSegment.attach(instance, layout)
        rows2, ids2, header2 = cache_layer_arrays(other, 1)
        assert np.array_equal(rows2, rows) and list(ids2) == [9, 2, -1] and list(header2) == [2, 17]
        rows2[0, 0] = -5.0  # writes are shared both ways
        assert rows[0, 0] == -5.0
        del rows2, ids2, header2
        other.close()
    finally:
        del rows, slot_ids, header
        owner.close()
        owner.unlink()
    assert not os.path.exists(segment_path(instance, "cache"))


def test_exchange_layout_arrays(instance):
    layout = exchange_layout(max_tokens=8, hidden_size=4, num_neurons=6, bundle_elements=12, store_dtype=np.float16,
                             hidden_dtype=np.float32, vocab_size=10, logits_rows=3, chunk_rows=5)
    segment = SharedSegment.create(instance, layout)
    try:
        arrays = segment.arrays
        assert arrays["hidden"].shape == (2, 8, 4) and arrays["hidden"].dtype == np.float32
        assert arrays["mask"].shape == (8, 6) and arrays["mask"].dtype == np.bool_
        assert arrays["computed"].shape == (2, 8, 6) and arrays["computed"].dtype == np.bool_  # max_sequences: max_tokens
        assert arrays["chunk_staging"].shape == (2, 5, 12) and arrays["chunk_staging"].dtype == np.float16
        assert arrays["logits"].shape == (3, 10) and arrays["logits"].dtype == np.float32
        assert os.path.getsize(segment.path) == layout.size_bytes
        with pytest.raises(SharedMemoryError, match="exists already"):
            SharedSegment.create(instance, layout)
    finally:
        segment.close()
        segment.unlink()
    with pytest.raises(SharedMemoryError, match="missing"):
        SharedSegment.attach(instance, layout)


def test_close_with_a_live_view_does_not_crash(instance):
    segment = SharedSegment.create(instance, neuron_cache_layout([2], 2, np.float32))
    view = segment.arrays["rows.0"]
    segment.close()  # the view keeps the mapping; no BufferError escapes
    view[0, 0] = 1.0
    segment.unlink()


def test_segment_names_carry_the_instance():
    assert parse_segment_name("flashllm-1234-ab12cd-cache") == ("1234-ab12cd", 1234, "cache")
    assert parse_segment_name("flashllm-client-thing") is None
    assert parse_segment_name("sem.flashllm-1-a-cache") is None


# ---------------------------------------------------------------------- endpoints


def test_endpoint_path_length_is_checked(tmp_path):
    assert endpoint(str(tmp_path), "compute") == f"ipc://{tmp_path}/compute.sock"
    with pytest.raises(EndpointPathTooLong, match="FLASHLLM_RUNTIME_DIR"):
        endpoint("/tmp/" + "x" * MAX_IPC_PATH_BYTES, "compute")


def test_instance_lock_tells_live_from_stale(tmp_path):
    live = InstanceDir(new_instance_id(), str(tmp_path)).create()
    assert instance_alive(live.instance, str(tmp_path))
    os.makedirs(tmp_path / "999999999-dead00")
    (tmp_path / "999999999-dead00" / "supervisor.lock").write_text("999999999\n")  # nobody holds it
    assert not instance_alive("999999999-dead00", str(tmp_path))
    assert stale_instance_dirs(str(tmp_path)) == ["999999999-dead00"]
    live.remove()
    assert not os.path.exists(live.path)
