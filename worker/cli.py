"""The `kodmobi` command: sandbox, dev, demo, sweep, send, status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Command = Callable[[argparse.Namespace], int]


def _lazy(module: str) -> Callable[[argparse.ArgumentParser], Command]:
    """Subcommands import their module only when chosen: `kodmobi --help` stays instant."""

    def register(parser: argparse.ArgumentParser) -> Command:
        import importlib

        mod = importlib.import_module(module)
        mod.add_arguments(parser)
        run: Command = mod.run
        return run

    return register


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Command]]] = {
    "sandbox": ("run the kod.mobi imitation (DESIGN §8)", _lazy("worker.sandbox.cli")),
}


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(prog="kodmobi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners: dict[str, Command] = {}
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (help_text, register) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            runners[name] = register(sub_parser)
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser, runners = build_parser(args_list)
    args = parser.parse_args(args_list)
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
