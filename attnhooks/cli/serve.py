"""``attnhooks serve STORE``: the local browser viewer of a store (needs ``attnhooks[serve]``)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add the ``serve`` command to the ``attnhooks`` subparsers ``sub``."""
    p = sub.add_parser(
        "serve",
        help="browse a store of any length in a local web page (zoomable map, exact tiles); needs attnhooks[serve]",
        description="Serves a read-only viewer of STORE and its JSON API (/api/attention, ...). The first line "
        "printed is the URL. Binds 127.0.0.1 (this machine only) unless --host says otherwise.",
    )
    p.add_argument("store")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free one; default: %(default)s)")
    p.add_argument(
        "--max-cells", type=int, default=1 << 20, help="largest window /api/attention returns (default: %(default)s)"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from attnhooks.serve import serve

    serve(args.store, host=args.host, port=args.port, max_cells=args.max_cells)
