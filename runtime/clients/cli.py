"""The `flashllm` command: one sub-command per user action, each a small function."""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from flashllm.runtime.core.engine_config import engine_from_args

EXIT_USER_ERROR = 2


def resolve_runtime(runtime: str, mode: str, device: str | None = None) -> str:
    """--runtime auto (runtime/core/mode_choice.py decides; kept here for callers of the CLI module)."""
    from flashllm.runtime.core.mode_choice import resolve_runtime as decide

    return decide(runtime, mode, device)


class CliError(Exception):
    """An error the user can fix; printed without a traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from flashllm.protocol.store_format import StoreError
    from flashllm.runtime.tools.convert.sources import ConvertError
    from flashllm.runtime.daemon.socket_lock import IpcEndpointError

    return (CliError, StoreError, ConvertError, IpcEndpointError, ValueError, FileNotFoundError, PermissionError)


# ---------------------------------------------------------------------- convert / verify


def cmd_convert(args) -> int:
    from flashllm.runtime.tools.convert.store_writer import convert

    manifest = convert(args.src, args.out, dtype=args.dtype, force=args.force, progress=not args.quiet)
    ffn_mib = manifest.ffn.total_bundle_bytes / 2**20
    print(f"wrote {args.out}: {manifest.arch.source_model_type}, {manifest.arch.num_hidden_layers} layers, "
          f"{manifest.arch.intermediate_size} FFN neurons/layer, FFN {ffn_mib:.1f} MiB on flash ({manifest.dtype})")
    return 0


def cmd_verify(args) -> int:
    from flashllm.workers.store_reader import verify_store

    for line in verify_store(args.store):
        if args.verbose:
            print(line)
    print(f"{args.store}: ok")
    return 0


# ---------------------------------------------------------------------- generate / eval


def _sampling_params(args):
    from flashllm.runtime.core.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=list(args.stop or []), ignore_eos=args.ignore_eos)


def cmd_generate(args) -> int:
    if args.socket:
        from flashllm.runtime.clients.client_cli import generate_via_daemon

        return generate_via_daemon(args)
    if not args.store:
        raise CliError("give --store STORE (or --socket PATH to use a running daemon)")
    params = _sampling_params(args)
    prompts = args.prompt
    with engine_from_args(args, max_batch=max(1, len(prompts))) as engine:
        stream = len(prompts) == 1 and not args.json

        def on_output(index, out):
            if stream:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()

        results = engine.generate(prompts, params, chat=args.chat, on_output=on_output)
    for prompt, result in zip(prompts, results):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": result.text, "tokens": result.tokens,
                              "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                              "ms_per_token": round(result.ms_per_token, 3),
                              "flash_read_bytes": result.flash_read_bytes, "mode": engine.mode,
                              "runtime": engine.runtime, "head_precision": engine.config.head_precision}))
        elif stream:
            print()
        else:
            print(f"--- {prompt}\n{result.text}")
    return 0


def cmd_eval(args) -> int:
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    with engine_from_args(args) as engine:
        ppl, tokens = engine.perplexity(text, window_tokens=args.window)
    if args.json:
        print(json.dumps({"perplexity": ppl, "tokens": tokens, "mode": engine.mode, "runtime": engine.runtime,
                          "head_precision": engine.config.head_precision}))
    else:
        print(f"perplexity {ppl:.3f} over {tokens} tokens ({engine.mode})")
    return 0


# ---------------------------------------------------------------------- parser


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling options every generating command takes (generate, batch)."""
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the model's compute (default: all cores for --mode dense; one core "
                        "fewer when reading flash, which leaves a core to the reads; OMP_NUM_THREADS if set)")


def add_sparse_policy_args(p: argparse.ArgumentParser) -> None:
    """The sliding window and the late-neuron policy of --mode sparse (engine commands and bench)."""
    from flashllm.workers.engine_config import COMPUTE_SETS, MISSING_POLICIES, SparseOptions

    p.add_argument("--neuron-window", type=positive_int, default=None, metavar="K",
                   help=f"--mode sparse: keep the neurons used by the last K tokens in memory, so a token reads only "
                        f"the ones they did not use (default {SparseOptions.window_tokens}); a larger K reads less "
                        "while the caches have room")
    p.add_argument("--missing-policy", choices=list(MISSING_POLICIES), default=None,
                   help="--mode sparse: neurons the same-layer check predicts but the lookahead missed are read "
                        "before the layer runs (read, the default) or left out for this token (skip: no read "
                        "waits on the layer's own input, fewer bytes, lower quality)")
    p.add_argument("--compute-set", choices=list(COMPUTE_SETS), default=None,
                   help="--mode sparse: what a token's FFN sums: the neurons predicted for it (predicted: the "
                        "output does not depend on --memory), or also the neurons of its window's earlier tokens "
                        "that the caches hold (window: closer to dense where the predicted sets leave out "
                        "nonzero contributions, more compute the larger --memory is); auto (default): window for "
                        "a SwiGLU model, predicted for a ReLU model or a --trace (their other neurons are zeros)")
    p.add_argument("--trace", type=trace_arg, default=None, metavar="SOURCE",
                   help="--mode sparse without predictors (e.g. a `flashllm synth` store): replay active-neuron sets "
                        "instead. paper: the paper's OPT-6.7B statistics, 3%% of neurons active and 2.4%% new per "
                        "token (paper:active=A,new=N,seed=S to change them); recorded:FILE.npz: sets recorded on a "
                        "calibrated store with `flashllm bench --record-trace`, rescaled to this store's shape. "
                        "Speed, bytes and memory are real; the text is not")


def trace_arg(text: str):
    from flashllm.workers.activation_trace import parse_trace

    try:
        return parse_trace(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return value


def add_engine_args(p: argparse.ArgumentParser, store_required: bool = True) -> None:
    p.add_argument("--store", required=store_required, help="flash store directory (from `flashllm convert`)")
    p.add_argument("--mode", default="auto", choices=["auto", "dense", "naive", "sparse"],
                   help="FFN source: all in memory, whole layers re-read from flash, or predicted neurons only; "
                        "auto (default): dense if the model fits --memory, else sparse if the store is calibrated, "
                        "else naive (dense without --memory)")
    p.add_argument("--memory", help="memory budget for resident weights + predictors + neuron caches + staging, "
                                    "e.g. 160MiB, 2GiB, or 60%% (of the model's bytes in the store: its weights, not its predictors)")
    p.add_argument("--keep-fraction", type=float, default=None,
                   help="--mode sparse: fraction of each layer's neurons predicted per token (default: 1 - the "
                        "calibrated --sparsity); smaller reads less and fits smaller --memory, at some quality")
    add_sparse_policy_args(p)
    p.add_argument("--max-context", type=int, default=None, help="KV cache length in tokens (default 2048)")
    p.add_argument("--resident-dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="hold embeddings, attention and head matrices in this dtype (default: the compute dtype, "
                        "float32 on CPU); float16 halves their memory, products stay in the compute dtype")
    p.add_argument("--head-precision", choices=["auto", "stored", "4bit"], default="auto",
                   help="how an 8-bit (q8_0) head is held: as stored (int8 rows), or as a 4-bit sketch in ~56%% of "
                        "the bytes whose top 32 logits are still computed exactly from the stored rows; auto "
                        "(default): as stored when the whole model fits --memory, else the sketch, whose freed "
                        "bytes hold FFN weights instead of reading them from flash")
    add_threads_arg(p)
    p.add_argument("--runtime", default="auto", choices=["auto", "inproc", "workers"],
                   help="run the model in this process, or pipelined in a prefetch and a compute (+ predictor) process "
                        "(--mode sparse only); auto (default): workers for --mode sparse on the CPU, inproc otherwise "
                        "(on a GPU, compute is too short for the overlap to pay for the messages)")
    p.add_argument("--no-verify-reads", dest="verify_reads", action="store_false",
                   help="don't check each FFN bundle read from flash against the store's checksums "
                        "(on by default: a corrupt store then fails the token that reads it, naming the neuron)")


BUILTIN_COMMANDS = ("convert", "verify", "generate", "eval")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from flashllm.runtime.tools.convert.quant_policy import DTYPE_OPTIONS

    parser = argparse.ArgumentParser(prog="flashllm", description="Run LLMs larger than memory from flash.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="write a flash store from a Hugging Face folder or a GGUF file")
    p.add_argument("src", help="Hugging Face checkpoint folder or .gguf file")
    p.add_argument("--out", required=True, help="store directory to create")
    p.add_argument("--dtype", default="auto", choices=DTYPE_OPTIONS,
                   help="auto (default): keep a GGUF file's quantization (Q8_0/Q4_0/Q4_1; Q4_K, Q6_K, Q5_x re-blocked), "
                        "float16 for Hugging Face checkpoints; q8_0/q4_0 quantize round-to-nearest per 32 weights")
    p.add_argument("--force", action="store_true", help="replace an existing store")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="check every region of a store against its checksums")
    p.add_argument("--store", required=True)
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="generate text for one or more prompts")
    add_engine_args(p, store_required=False)
    p.add_argument("--socket", help="use the daemon listening on this ipc socket path instead of --store")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    add_sampling_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt")
    p.add_argument("prompt", nargs="+")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="perplexity of a text file")
    add_engine_args(p)
    p.add_argument("--text", required=True)
    p.add_argument("--window", type=int, default=1024, help="tokens per evaluation window")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    for register in _extra_commands(argv):
        register(sub)
    return parser


# sub-command → the module that registers it; only the module of the command being run is imported,
# so `flashllm status` does not pay for torch
EXTRA_COMMAND_MODULES = {
    "calibrate": "flashllm.runtime.tools.calibrate",
    "bench": "flashllm.runtime.tools.bench",
    "serve": "flashllm.runtime.daemon.serve",
    "status": "flashllm.runtime.clients.client_cli",
    "batch": "flashllm.runtime.clients.batch",
    "bench-serve": "flashllm.runtime.clients.serve_bench",
    "bench-peer": "flashllm.runtime.tools.bench_peer",
    "synth": "flashllm.runtime.tools.synth",
}


def _extra_commands(argv: list[str] | None):
    """register_cli functions of the sub-command modules: the one named in argv, or all (for --help)."""
    argv = sys.argv[1:] if argv is None else argv
    named = next((a for a in argv if not a.startswith("-")), None)
    if named in EXTRA_COMMAND_MODULES:
        module_names = [EXTRA_COMMAND_MODULES[named]]
    elif named in BUILTIN_COMMANDS:
        module_names = []
    else:
        module_names = list(dict.fromkeys(EXTRA_COMMAND_MODULES.values()))
    return [importlib.import_module(name).register_cli for name in module_names]


def print_synthetic_notice(store_dir: str | None) -> None:
    """Every command run on a `flashllm synth` store says, once, that its weights are random."""
    from flashllm.protocol.store_format import StoreError, read_manifest, synthetic_notice

    if not store_dir:
        return
    try:
        notice = synthetic_notice(read_manifest(store_dir))
    except StoreError:
        return  # the command itself reports what is wrong with the store
    if notice:
        print(notice, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        if args.command not in ("convert", "synth"):  # those write a store; the others run one
            print_synthetic_notice(getattr(args, "store", None))
        return args.func(args)
    except _user_errors() as exc:
        print(f"flashllm {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"flashllm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m flashllm.runtime.clients.cli` runs this file as __main__; the sub-command modules raise
    # flashllm.runtime.clients.cli.CliError, so run that module's main, whose _user_errors() names that same class.
    from flashllm.runtime.clients.cli import main as package_main

    sys.exit(package_main())
