"""Per-bundle checksums of ffn.bin, checked as rows arrive from flash.

`flashllm convert` writes one xxh3-64 digest per neuron bundle beside the data:

    STORE/ffn.xxh3     little-endian uint64, layer after layer, one per bundle in store order
                       (named by the manifest's ffn.bundle_checksums; absent in older stores)

and the BundleReader hands every row it delivers (sparse reads, naive whole
layers, the dense path's load) to `BundleChecksums.check()`, so one flipped
byte fails the token that reads it, with the layer and neuron named, instead
of changing the text silently. `flashllm verify` still hashes whole regions
(sha256); this is the cheap check on every read: xxh3 runs at memory speed,
one call per bundle.
"""
from __future__ import annotations

import os

import numpy as np
import xxhash

from flashllm.protocol.client_api import ErrorCode
from flashllm.protocol.store_format import FfnLayout, StoreError

CHECKSUM_FILE = "ffn.xxh3"
CHECKSUM_DTYPE = np.dtype("<u8")


class BundleChecksumError(StoreError):
    """A bundle read from flash does not match its checksum: the store is corrupt (or the device returned bad data)."""

    client_error_code = ErrorCode.STORE_CORRUPT  # what the daemon tells the request's client


def bundle_digests(rows: np.ndarray) -> np.ndarray:
    """rows (k, E) of any dtype → (k,) uint64 xxh3-64 digests of each row's bytes."""
    rows = np.ascontiguousarray(rows)
    digest = xxhash.xxh3_64_intdigest
    return np.fromiter((digest(row) for row in rows), dtype=CHECKSUM_DTYPE, count=rows.shape[0])


def write_checksums(store_dir: str, per_layer: list[np.ndarray]) -> str:
    """Write the checksum file from each layer's (num_neurons,) digests; returns its name for the manifest."""
    with open(os.path.join(store_dir, CHECKSUM_FILE), "wb") as f:
        for digests in per_layer:
            f.write(np.asarray(digests, dtype=CHECKSUM_DTYPE).tobytes())
    return CHECKSUM_FILE


class BundleChecksums:
    """The store's per-bundle checksums, for checking rows as they arrive."""

    def __init__(self, store_dir: str, layout: FfnLayout):
        self.path = os.path.join(store_dir, layout.bundle_checksums)
        self.layout = layout
        expected_count = sum(region.num_neurons for region in layout.layers)
        try:
            digests = np.fromfile(self.path, dtype=CHECKSUM_DTYPE)
        except FileNotFoundError:
            raise StoreError(f"{self.path}: the FFN checksum file named by the manifest is missing; re-run "
                             "`flashllm convert` (or open the store with checksums off)") from None
        if digests.size != expected_count:
            raise StoreError(f"{self.path}: holds {digests.size} checksums but the store has {expected_count} "
                             "bundles; it is truncated, re-run `flashllm convert`")
        starts = np.cumsum([0] + [region.num_neurons for region in layout.layers])
        self._per_layer = [digests[starts[i]:starts[i + 1]] for i in range(len(layout.layers))]
        self._layer_digests: dict[int, int] = {}  # layer → xxh3 of its whole region, once checked bundle by bundle

    def check_layer(self, layer: int, rows: np.ndarray) -> None:
        """rows (n, E): a whole layer as it arrived. The first time, every bundle is checked and the layer's
        own xxh3 is remembered; after that one digest over the layer checks it (a naive step reads every
        layer, and one call per bundle cost more than the conversion beside it), falling back to the
        per-bundle check, which names the bad neuron, when it differs."""
        layer_bytes = np.ascontiguousarray(rows)
        digest = xxhash.xxh3_64_intdigest(layer_bytes)
        if self._layer_digests.get(layer) == digest:
            return
        self.check(layer, np.arange(rows.shape[0]), rows)  # raises on a bad bundle
        self._layer_digests[layer] = digest

    def check(self, layer: int, neuron_ids: np.ndarray, rows: np.ndarray) -> None:
        """rows (k, E): the bundles of store positions neuron_ids (k,) as they arrived; BundleChecksumError
        naming the first bad one."""
        if len(neuron_ids) == 0:
            return
        got = bundle_digests(rows)  # (k,)
        bad = np.flatnonzero(got != self._per_layer[layer][neuron_ids])
        if bad.size:
            position = int(neuron_ids[bad[0]])
            order = self.layout.layers[layer].neuron_order
            neuron = order[position] if order is not None else position
            raise BundleChecksumError(
                f"layer {layer} neuron {neuron} (store position {position}) failed its checksum "
                f"({bad.size} of {len(neuron_ids)} bundles read in this call): the store is corrupt; run "
                f"`flashllm verify --store {os.path.dirname(self.path)}` and re-convert it")


VERIFY_READS_ENV = "FLASHLLM_VERIFY_READS"  # "0": don't check reads (--no-verify-reads sets it for the workers)


def reads_verified(verify_reads: bool | None = None) -> bool:
    """The one place that decides whether reads are checked: an explicit choice, else the environment, else on."""
    if verify_reads is not None:
        return verify_reads
    return os.environ.get(VERIFY_READS_ENV, "1") != "0"


def open_checksums(store_dir: str, layout: FfnLayout, enabled: bool = True) -> BundleChecksums | None:
    """The store's checksums when it has them and checking is on; None otherwise (nothing is checked)."""
    if not enabled or not getattr(layout, "bundle_checksums", None):
        return None
    return BundleChecksums(store_dir, layout)
