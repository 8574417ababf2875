"""The one public way from command-line options to an engine: generate, eval, serve, batch and bench use it.

    config = engine_config_from_args(args, max_batch=4)   # checks every option, builds nothing
    with engine_from_args(args, max_batch=4) as engine:   # the Engine that config asks for
        ...

`args` is any object with the engine flags' attributes (an argparse Namespace
from `flashllm.runtime.clients.cli.add_engine_args`); a flag it lacks takes
the EngineConfig default, except --runtime, which is auto here as on the
command line.
"""
from __future__ import annotations

import os
import sys

from flashllm.workers.engine_config import EngineConfig, SparseOptions

__all__ = ["EngineConfig", "SparseOptions", "engine_config_from_args", "engine_from_args", "parse_memory",
           "parse_size"]


def engine_config_from_args(args, max_batch: int = 1) -> EngineConfig:
    """The EngineConfig the engine flags in `args` ask for; ValueError naming the flag when one is invalid."""
    memory = getattr(args, "memory", None)
    return EngineConfig(mode=args.mode, runtime=getattr(args, "runtime", "auto"),
                        memory_budget_bytes=parse_memory(memory, getattr(args, "store", None)) if memory else None,
                        max_batch=max_batch, max_context=getattr(args, "max_context", None),
                        resident_dtype=getattr(args, "resident_dtype", None),
                        head_precision=getattr(args, "head_precision", None) or "auto",
                        threads=getattr(args, "threads", None),
                        worker_restarts=getattr(args, "worker_restarts", None), sparse=_sparse_options_from_args(args))


def _sparse_options_from_args(args) -> SparseOptions | None:
    """The sparse flags given (None when none is: the defaults then apply)."""
    given = {option: getattr(args, flag, None)
             for flag, option in (("keep_fraction", "keep_fraction"), ("neuron_window", "window_tokens"),
                                  ("missing_policy", "missing_policy"), ("compute_set", "compute_set"),
                                  ("trace", "trace"))}
    given = {option: value for option, value in given.items() if value is not None}
    return SparseOptions(**given) if given else None


def engine_from_args(args, max_batch: int = 1):
    """The Engine for the engine flags in `args` (--mode auto and --runtime auto are resolved by the engine);
    --no-verify-reads applies to every reader in this process and the workers it spawns."""
    from flashllm.runtime.core.engine import Engine
    from flashllm.workers.flash_io.integrity import VERIFY_READS_ENV

    config = engine_config_from_args(args, max_batch)
    if not getattr(args, "verify_reads", True):
        os.environ[VERIFY_READS_ENV] = "0"
    engine = Engine(args.store, config=config)
    if config.mode == "auto" and config.memory_budget_bytes is not None:  # a choice the budget made: say which
        print(f"flashllm: {engine.mode_reason}", file=sys.stderr)
    if engine.head_reason:
        print(f"flashllm: {engine.head_reason}", file=sys.stderr)
    trace = config.sparse_options.trace
    if trace is not None and engine.mode == "sparse":
        print(f"flashllm: --trace {trace}: the active neurons are replayed from a trace, not predicted from the "
              "model: speed, bytes and memory are real, the text is not", file=sys.stderr)
    return engine


def parse_memory(text: str, store_dir: str | None) -> int:
    """--memory: a size ('160MiB', '2GiB') or a share of the model's bytes in the store ('60%')."""
    from flashllm.runtime.core.mode_choice import budget_from_percent

    if text.strip().endswith("%"):
        if not store_dir:
            raise ValueError(f"--memory {text}: a percentage is of the model's bytes in the store; give --store")
        return budget_from_percent(text, store_dir)
    return parse_size(text)


def parse_size(text: str) -> int:
    """'160MiB', '2GiB', '500MB', '1048576' → bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30,
             "k": 2**10, "m": 2**20, "g": 2**30}
    stripped = text.strip().lower()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = stripped[len(number):].strip()
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise ValueError(f"size {text!r} is not understood; write e.g. 160MiB, 2GiB or 500MB")
    return int(value * units[unit])
