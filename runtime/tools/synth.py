"""`flashllm synth --shape NAME --dtype DTYPE --out STORE`: a store of random weights in a real model's shape.

No 7B checkpoint has to be fetched to measure flashllm at the scale it is for:
the store has the named model's tensor shapes (runtime/tools/convert/shapes.py),
bundle sizes and read pattern, so speed, bytes read and memory are real; the
weights are seeded random numbers, so the text is not. It is written by the same
store writer as `flashllm convert` (one layer in memory at a time, progress bar,
quantization, checksums, OUT.partial renamed into place), and its manifest marks
it synthetic so that every run on it says so.
"""
from __future__ import annotations

from flashllm.protocol.store_format import Manifest
from flashllm.runtime.tools.convert.quant_policy import DTYPE_OPTIONS

# convert's --dtype choices less auto, which follows a source's own kinds (random weights have none)
SYNTH_DTYPES = tuple(dtype for dtype in DTYPE_OPTIONS if dtype != "auto")


def synthesize(shape_name: str, out: str, dtype: str, seed: int = 0, force: bool = False,
               progress: bool = True, gguf_path: str | None = None) -> Manifest:
    """Write the store (and with gguf_path the same weights as a GGUF file); refuses before writing anything."""
    import os

    from flashllm.runtime.tools.convert.gguf_export import check_gguf_exportable, write_synthetic_gguf
    from flashllm.runtime.tools.convert.shapes import shape_named
    from flashllm.runtime.tools.convert.sources import ConvertError
    from flashllm.runtime.tools.convert.store_writer import (
        check_disk_space, estimate_store_bytes, plan_store, write_store,
    )
    from flashllm.runtime.tools.convert.synthetic_source import SyntheticSource

    shape = shape_named(shape_name)
    if dtype not in SYNTH_DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not a synthetic store dtype; use one of {', '.join(SYNTH_DTYPES)}")
    source = SyntheticSource(shape_name, shape, seed)
    plan = plan_store(source, dtype)
    if gguf_path is not None:
        gguf_path = os.path.abspath(gguf_path)
        check_gguf_exportable(source)
        if os.path.exists(gguf_path) and not force:
            raise ConvertError(f"{gguf_path} already exists; pass --force to replace it")
        os.makedirs(os.path.dirname(gguf_path), exist_ok=True)
        # the GGUF holds the same tensors in the same kinds as the store: about its size again
        check_disk_space(os.path.dirname(gguf_path), 2 * estimate_store_bytes(source, plan), "the store and the GGUF",
                         "--gguf")
    # quantization error lines are left out: the "original" weights are random numbers too
    manifest = write_store(source, out, dtype=dtype, force=force, progress=progress, log=lambda line: None,
                           progress_label="synth")
    if gguf_path is not None:
        write_synthetic_gguf(source, plan, gguf_path, progress=progress)
    return manifest


def cmd_synth(args) -> int:
    manifest = synthesize(args.shape, args.out, args.dtype, seed=args.seed, force=args.force,
                          progress=not args.quiet, gguf_path=args.gguf)
    store_mib = (manifest.ffn.file_bytes + _resident_bytes(args.out, manifest)) / 2**20
    print(f"wrote {args.out}: random weights in the shape of {args.shape} (seed {args.seed}), "
          f"{manifest.arch.num_hidden_layers} layers, {manifest.arch.intermediate_size} FFN neurons/layer, "
          f"{store_mib:.1f} MiB ({manifest.dtype})")
    if args.gguf:
        print(f"wrote {args.gguf}: the same weights as a llama-architecture GGUF for llama.cpp")
    return 0


def _resident_bytes(store: str, manifest: Manifest) -> int:
    import os

    return os.path.getsize(os.path.join(store, manifest.resident_file))


def register_cli(sub) -> None:
    from flashllm.runtime.tools.convert.shapes import SHAPES

    p = sub.add_parser("synth", help="write a store of random weights in the shape of a named model "
                                     "(measure speed, bytes and memory at 7B scale without a checkpoint)")
    p.add_argument("--shape", required=True, choices=list(SHAPES),
                   help="the model whose shape to copy (shapes.py cites each one's config.json)")
    p.add_argument("--dtype", required=True, choices=SYNTH_DTYPES,
                   help="store dtype: a float type, or q8_0/q4_0 blocks of 32 weights")
    p.add_argument("--out", required=True, help="store directory to create")
    p.add_argument("--seed", type=int, default=0, help="the same shape, dtype and seed write the same bytes")
    p.add_argument("--gguf", metavar="OUT.gguf", default=None,
                   help="also write the same weights as a GGUF file that llama.cpp loads (llama-family shapes)")
    p.add_argument("--force", action="store_true", help="replace an existing store (and --gguf file)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)
