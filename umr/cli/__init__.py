"""The `umr` command: argument parsing and display only; each command imports what it needs.

One module per group of commands, each adding its own parsers; this one puts them together and
turns what a command raises into an exit status."""
from __future__ import annotations

import argparse
import os
import sys

from umr import __version__
from umr.cli import index_commands, serving, training_commands, update_commands
from umr.cli.args import Parser, UserError, leaf_parsers
from umr.cli.serving import SERVE_ENV
from umr.logs import LEVELS
from umr.retrieval.numerics import IMAGE_DECODES, PRECISIONS

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["SERVE_ENV", "UserError", "build_parser", "main", "one_line"]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="umr", description="Universal multimodal retrieval.")
    p.add_argument("--version", action="version", version=f"umr {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    index_commands.add_index_commands(sub)
    serving.add_search_command(sub)
    serving.add_serve_commands(sub)
    training_commands.add_training_commands(sub)
    update_commands.add_update_command(sub)
    training_commands.add_mining_commands(sub)
    serving.add_demo_command(sub)
    for leaf in leaf_parsers(p):
        _add_common_flags(leaf)
    return p


def _add_common_flags(leaf: argparse.ArgumentParser) -> None:
    leaf.add_argument("--log-level", choices=LEVELS, default="warning",
                      help="umr's log messages on stderr from this level (default: warning; info logs each HTTP request)")
    leaf.add_argument("--log-format", choices=("text", "json"), default="text",
                      help="json: one object per line, with the request id on every line a request caused")
    leaf.add_argument("--device", help="where encoders run, and FAISS with faiss-gpu installed: auto (the default, "
                                       "or $UMR_DEVICE: cuda when torch sees a GPU), cpu, cuda, cuda:N")
    leaf.add_argument("--precision", choices=PRECISIONS,
                      help="the encoders' forward passes: float32 (the default, or $UMR_PRECISION) or float16 "
                           "autocast, within cosine 0.999 of float32 and faster on a GPU")
    leaf.add_argument("--image-decode", choices=IMAGE_DECODES,
                      help="where JPEGs are decoded and resized: cpu (the default, or $UMR_IMAGE_DECODE, the "
                           "preparation workers) or device (torchvision's decoder on the --device, nvJPEG on a GPU)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if runs_forwards(args):
        from umr.retrieval.cpu_memory import keep_freed_memory

        keep_freed_memory()  # forwards reuse their memory (retrieval/cpu_memory.py)
    if args.command == "serve":
        for key, value in SERVE_ENV.items():
            os.environ.setdefault(key, value)
    from umr import logs

    logs.configure(args.log_level, args.log_format)
    from umr.index.errors import UmrError

    try:
        if args.device:
            from umr.retrieval.device import choose

            choose(args.device)
        from umr.retrieval import numerics
        numerics.choose(args.precision, args.image_decode)
        return args.fn(args)
    except BrokenPipeError:  # `umr search ... | head` closed the pipe: what was wanted has been read
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a shell tool stopped by the closed pipe exits
    except (UserError, UmrError, OSError) as e:  # raised on purpose, or a file's or the network's: the user's to fix
        print(f"umr: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("umr: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug: show where, and ask for the report
        import traceback

        traceback.print_exc()
        print(f"umr: internal error (umr {__version__}, `umr {args.command}`): this is a bug in umr, not in your input. "
              "Please report it with the traceback above.", file=sys.stderr)
        return 70


def runs_forwards(args: argparse.Namespace) -> bool:
    """Whether a command runs an encoder's forward passes over and over, the work that keeping
    freed memory speeds up. Those that only move stored vectors (an import of precomputed ones,
    tuning, verify, compact) keep glibc's defaults: serving their large, uneven arrays from the
    heap raised a 2M-vector import's peak by 30% and kept it to the end. A command says so
    with `forwards` (True, False, or a function of its arguments), True where it says nothing."""
    forwards = getattr(args, "forwards", True)
    return bool(forwards(args) if callable(forwards) else forwards)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of the closed pipe does not
    print a second Broken pipe error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a file descriptor (redirected in-process)
        pass


def one_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else e.__class__.__name__
