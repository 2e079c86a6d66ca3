"""The ``sluice`` command."""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import sqlite3
import sys
from typing import Sequence

from . import __version__
from .config import load_config
from .errors import ConfigError


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=None, help="config file (default: $SLUICE_CONFIG, then the built-in defaults)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice: an observability and governance sidecar for LLM traffic.")
    parser.add_argument("--version", action="version", version=f"sluice {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="serve the proxy")
    _config_arg(p)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ready-file", default=None, help="write {pid, port, admin_port} as JSON here once listening")

    p = sub.add_parser("check", help="validate a config file without serving")
    p.add_argument("file", nargs="?", default=None, help="the config file (default: $SLUICE_CONFIG, then the built-in defaults)")
    _config_arg(p)  # -c FILE too, as every other command that reads the config takes it

    p = sub.add_parser("demo-upstream", help="run the built-in OpenAI-compatible demo model server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-delay-ms", type=float, default=0.0, help="delay between streamed tokens")

    # commands offered by plugins, possibly two words ("eval pii")
    commands: dict[str, object] = {}
    groups: dict[str, argparse._SubParsersAction] = {}
    try:
        from .registry import plugin_registry

        classes = list(plugin_registry().values())
    except Exception as e:  # a broken third-party plugin must not break `sluice --version`
        print(f"sluice: warning: plugins could not be loaded ({type(e).__name__}: {e})", file=sys.stderr)
        classes = []
    for cls in classes:
        try:
            offered = cls.commands()
        except Exception as e:  # one plugin's broken commands must not break every command
            print(f"sluice: warning: plugin {cls.name}'s commands could not be loaded ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        for cmd in offered:
            words = cmd.name.split()
            try:  # argparse refuses a name taken (by Sluice's commands or another plugin's)
                if len(words) == 1:
                    cp = sub.add_parser(words[0], help=cmd.help)
                else:
                    group = groups.get(words[0])
                    if group is None:
                        gp = sub.add_parser(words[0], help=f"{words[0]} commands")
                        group = groups[words[0]] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
                    cp = group.add_parser(words[1], help=cmd.help)
            except argparse.ArgumentError:
                print(f"sluice: warning: plugin {cls.name}'s command {cmd.name!r} is taken: left out", file=sys.stderr)
                continue
            _config_arg(cp)
            cmd.configure(cp)
            cp.set_defaults(_plugin_command=cmd)
            commands[cmd.name] = cmd
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    parser, _ = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "serve":
        from .server import serve

        if args.worker is not None:
            os.environ["SLUICE_WORKER"] = str(args.worker)
        return serve(args.config, worker=args.worker, ready_fd=args.ready_fd, ready_file=args.ready_file)
    if args.command == "check":
        if args.file and args.config and os.path.realpath(args.file) != os.path.realpath(args.config):
            print("sluice: check takes one config file: FILE or -c FILE", file=sys.stderr)
            return 2
        try:
            loaded = load_config(args.file or args.config)
        except ConfigError as e:
            print(f"sluice: {e}", file=sys.stderr)
            return 1
        n = sum(len(c) for c in loaded.chains)
        print(f"{loaded.source}: ok ({len(loaded.config.routes)} routes, {len(loaded.config.upstreams)} upstreams, {n} plugin instances)")
        return 0
    if args.command == "demo-upstream":
        from .demo import run
        from .server import install_uvloop

        install_uvloop()
        asyncio.run(run(args.host, args.port, args.token_delay_ms / 1000))
        return 0
    cmd = getattr(args, "_plugin_command", None)
    if cmd is None:  # pragma: no cover - argparse rejects unknown commands first
        parser.print_help()
        return 2
    try:
        loaded = load_config(args.config)
    except ConfigError as e:
        print(f"sluice: {e}", file=sys.stderr)
        return 1
    try:
        result = cmd.run(args, loaded)
        if inspect.isawaitable(result):
            result = asyncio.run(result)
    except (OSError, sqlite3.DatabaseError) as e:
        # a state.dir that is not a directory, a store that is not a database: one line, not a traceback
        print(f"sluice {args.command}: {e}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
