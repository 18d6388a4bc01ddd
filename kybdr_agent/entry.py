"""The ``kybdr-agent`` console script: ``wal-push`` first, everything else through ``kybdr_agent.cli``.

Why a module of its own: ``archive_command = 'kybdr-agent wal-push %p'`` starts a process per WAL file, and
importing the CLI (pydantic, aiohttp, structlog, the whole agent) costs ~0.3 s of CPU per start. This module
imports nothing but ``sys`` before deciding, and sends ``wal-push`` to ``wal.push_client``, which uses the
standard library only. Any other command — and ``--help`` or ``--version`` anywhere — goes to the CLI as
before, so ``kybdr-agent`` behaves exactly as it did for everything else.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing and collections.abc are not imported at run time: see the docstring
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Final

# Global options that may come before ``wal-push`` (``--config`` takes a value).
_FLAGS: Final = frozenset({"-v", "--verbose", "--local"})


def is_wal_push(argv: Sequence[str]) -> bool:
    """Whether the command line is ``[--config FILE] [-v] [--local] wal-push …`` and asks for no help."""
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "wal-push":
            return not any(a in ("-h", "--help", "--version") for a in args[i + 1 :])
        if arg == "--config":
            i += 2
        elif arg.startswith("--config=") or arg in _FLAGS:
            i += 1
        else:
            return False
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if is_wal_push(args):
        from kybdr_agent.wal.push_client import main as push_main

        return push_main(args)
    from kybdr_agent.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
