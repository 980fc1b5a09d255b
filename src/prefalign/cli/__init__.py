"""`prefalign` command line: train, eval, demo, compare, data inspect, generate, sweep, online.

Every sub-command lives in its own module and registers itself through an `add_parser(subparsers)`
function that sets `func`. A user's mistake (PrefalignError) prints one line and exits 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (module, function) pairs; imported lazily so `prefalign --help` stays fast.
COMMANDS = [
    ("prefalign.cli.train", "add_parser"),
    ("prefalign.cli.eval", "add_parser"),
    ("prefalign.cli.demo", "add_parser"),
    ("prefalign.cli.compare", "add_parser"),
    ("prefalign.cli.data", "add_parser"),
    ("prefalign.cli.bench", "add_parser"),
    ("prefalign.cli.generate", "add_parser"),
    ("prefalign.cli.sweep", "add_parser"),
    ("prefalign.cli.online", "add_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefalign", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for module_name, fn in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):  # not built yet
                continue
            raise
        getattr(module, fn)(sub)
    return parser


def _one_spelling(argv: list[str]) -> list[str]:
    """TRL's underscore spelling works in every command: `--max_length` is `--max-length` outside `train`
    (whose keys are TRL's underscore names and accept dashes)."""
    command = next((t for t in argv if not t.startswith("-")), None)
    if command == "train":
        return argv
    out = []
    for token in argv:
        if token.startswith("--"):
            key, eq, value = token.partition("=")
            token = key.replace("_", "-") + eq + value
        out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    from ..errors import PrefalignError

    argv = sys.argv[1:] if argv is None else argv
    argv = _one_spelling(list(argv))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "accepts_overrides", False):
        args.overrides = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = int(args.func(args) or 0)
    except PrefalignError as e:
        if args.debug:
            raise
        print(f"prefalign: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefalign: interrupted", file=sys.stderr)
        return 130
    _close_process_group()
    return code


def _close_process_group() -> None:
    """After a command that ran under a launcher: left to the interpreter's exit, gloo's worker threads can
    still hold tensors while Python is torn down, and a process aborts ("terminate called without an active
    exception", SIGABRT; pytorch/pytorch#190489) after its run was saved. Only on success: a process that
    failed must not wait on the others."""
    dist = sys.modules.get("torch.distributed")  # never imported: nothing to close
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
