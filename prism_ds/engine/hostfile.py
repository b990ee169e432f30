"""Validate DeepSpeed hostfiles (one `<host> slots=<n>` per line) before a multi-node launch.

DeepSpeed's own parser accepts trailing junk, silently falls back to local resources when the file is
missing, and reports errors without a line number; this one is strict and names `file:line`.
Stdlib only, so the launchers can run it as a script without importing torch:
    python prism_ds/engine/hostfile.py check HOSTFILE [--first]   # or: python -m prism_ds.engine.hostfile ...
"""
from __future__ import annotations

import argparse
import re
import sys
from os import PathLike

_SLOTS = re.compile(r"slots=([0-9]+)")


class HostfileError(ValueError):
    """A hostfile that DeepSpeed would reject or misread; the message names `file:line`."""


def read_hostfile(path: str | PathLike[str]) -> dict[str, int]:
    """Parse and validate a DeepSpeed hostfile into {host: slots}, in file order (first host = master)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise HostfileError(f"{path}: cannot read hostfile: {getattr(e, 'strerror', None) or e}") from None
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()  # DeepSpeed ignores "#" lines and text after "slots=<n>"
        if not line:
            continue
        where, text = f"{path}:{lineno}", raw.strip()
        parts = line.split()
        if len(parts) != 2 or not parts[1].startswith("slots="):
            raise HostfileError(f"{where}: expected '<host> slots=<n>', got {text!r}")
        match = _SLOTS.fullmatch(parts[1])
        if match is None or int(match.group(1)) <= 0:
            raise HostfileError(f"{where}: slots must be a positive integer, got {text!r}")
        host = parts[0]
        if host in hosts:
            raise HostfileError(f"{where}: duplicate host {host!r} (first on line {first_line[host]}): {text!r}")
        hosts[host], first_line[host] = int(match.group(1)), lineno
    if not hosts:
        raise HostfileError(f"{path}: hostfile has no hosts (only blank lines and comments)")
    return hosts


def main(argv: list[str] | None = None) -> int:
    """`check HOSTFILE` prints its hosts and total slots; `check HOSTFILE --first` prints only the first host."""
    parser = argparse.ArgumentParser(prog="python -m prism_ds.engine.hostfile", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate HOSTFILE and print its hosts and total slots")
    check.add_argument("hostfile")
    check.add_argument("--first", action="store_true", help="print just the first host (the default master)")
    args = parser.parse_args(argv)
    try:
        hosts = read_hostfile(args.hostfile)
    except HostfileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.first:
        print(next(iter(hosts)))
        return 0
    for host, slots in hosts.items():
        print(f"{host} slots={slots}")
    print(f"{args.hostfile}: {len(hosts)} hosts, {sum(hosts.values())} slots in total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
