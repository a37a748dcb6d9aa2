"""The ``edgepin`` command: operator commands and the node's ``edgepin node ...``."""

from __future__ import annotations

import argparse
import sys

from provisioner import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepin",
        description="Single-VM edge appliances governed by Keystone, Glance and Barbican.",
    )
    parser.add_argument("--version", action="version", version=f"edgepin {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
