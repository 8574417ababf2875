"""What a direct read costs on the device: the two numbers the read planner merges gaps by.

With a round of requests in flight, the time a read takes grows about linearly
with its size: t(size) = request_s + size * byte_s. Reading the gap between
two wanted bundles instead of issuing a second request pays off when
gap * byte_s < request_s, i.e. for gaps below `break_even_gap_bytes`.

The default model was fitted on this project's development disk; `flashllm
bench` measures the curve on the user's device (raw AIO reads from 512 B to
1 MiB at the reader's queue depth), prints the fit and records it in its JSON,
and `BundleReader(read_cost=...)` takes a measured one. docs/benchmarks.md
holds the measured figures behind the default.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# reads in flight when the curve is measured: a decode step's layer read puts tens of requests on the queue,
# not the AIO queue's full depth
CURVE_QUEUE_DEPTH = 64
# request sizes the curve is measured at: 512 B (the smallest logical block) .. 1 MiB (the planner's largest)
CURVE_REQUEST_SIZES_BYTES = tuple(512 << shift for shift in range(12))


@dataclass(frozen=True)
class ReadCostModel:
    """t(size) = request_s + size * byte_s for one direct read, with the reader's queue of reads in flight."""

    request_s: float  # the fixed cost of a request: what merging two requests saves
    byte_s: float  # the cost of a byte: what reading a gap costs per byte (1 / streaming bandwidth)
    source: str = "default"  # "default", or where and how it was measured

    def __post_init__(self):
        if not (self.request_s >= 0 and self.byte_s > 0):
            raise ValueError(f"a read cost needs request_s >= 0 and byte_s > 0, got {self.request_s}, {self.byte_s}")

    @property
    def break_even_gap_bytes(self) -> int:
        """Largest gap that costs less to read than a separate request."""
        return int(self.request_s / self.byte_s)

    def read_s(self, request_bytes: np.ndarray | int) -> np.ndarray | float:
        return self.request_s + np.asarray(request_bytes) * self.byte_s


# Fitted with `fit_read_cost` on the development machine's virtio disk (AIO, queue depth 64);
# the measurement and its command are in docs/benchmarks.md.
DEFAULT_READ_COST = ReadCostModel(request_s=23e-6, byte_s=0.56e-9,
                                  source="default: fitted on the development disk (docs/benchmarks.md)")


def fit_read_cost(request_bytes: list[int], seconds_per_request: list[float], source: str) -> ReadCostModel:
    """Least-squares fit of t = request_s + size * byte_s, each point weighted by 1/t so that the small
    requests (microseconds) count as much as the large ones (a millisecond); a negative intercept
    (noise) is clipped to zero."""
    sizes = np.asarray(request_bytes, dtype=np.float64)  # (n,)
    times = np.asarray(seconds_per_request, dtype=np.float64)  # (n,)
    if len(sizes) < 2 or len(np.unique(sizes)) < 2:
        raise ValueError(f"fitting a read cost needs at least two request sizes, got {request_bytes}")
    weights = 1.0 / times  # (n,) relative error
    design = np.stack([np.ones_like(sizes), sizes], axis=1) * weights[:, None]  # (n, 2)
    (request_s, byte_s), *_ = np.linalg.lstsq(design, times * weights, rcond=None)
    if byte_s <= 0:
        raise ValueError(f"the measured read times do not grow with size ({list(zip(request_bytes, seconds_per_request))}); "
                         "measure again on a quieter device or with more bytes")
    return ReadCostModel(max(0.0, float(request_s)), float(byte_s), source)
