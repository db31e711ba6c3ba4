"""``attnhooks serve STORE``: a local, read-only browser viewer of a store of any length.

The page (one document, its script inline, no CDN) shows a zoomable, pannable attention map of one
head: the pooled overview at low zoom (the stored summary's, or pooled while reading), exact 256 x 256
tiles at high zoom (read or rebuilt from q, k and lse by :class:`~attnhooks.read.store.Store`, never
a whole head), token labels once cells are wide enough, and on hover the query token, the key token
and the exact weight. Beside it: attention received per key, row entropy and sink mass (from the
summary), and the strongest keys and scores of a clicked query row. The JSON API it uses is
documented in :mod:`attnhooks.serve.api`.

Needs ``attnhooks[serve]`` (starlette, uvicorn); binds ``127.0.0.1`` unless told otherwise.

Example:
    >>> from attnhooks.serve import serve
    >>> serve("long.zarr", port=8765)  # doctest: +SKIP
    http://127.0.0.1:8765/
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, TextIO

from attnhooks.serve.api import MAX_CELLS, Api, ApiError

__all__ = ["MAX_CELLS", "Api", "ApiError", "app_for", "need_extra", "serve"]


def need_extra() -> None:
    """Raise a one-line ``ImportError`` naming the extra when starlette or uvicorn is missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"attnhooks serve needs starlette and uvicorn ({err.name} is missing): pip install 'attnhooks[serve]'"
        ) from err


def app_for(location: str | os.PathLike[str], *, max_cells: int = MAX_CELLS) -> Any:
    """The ASGI app serving the store at ``location`` (opened read-only)."""
    need_extra()
    from attnhooks.read.store import open_store
    from attnhooks.serve.app import make_app

    store = open_store(location, "r")
    return make_app(Api(store, max_cells=max_cells), title=f"attnhooks · {Path(os.fspath(location)).name}")


def serve(
    location: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    max_cells: int = MAX_CELLS,
    out: TextIO | None = None,
) -> None:
    """Serve the store until interrupted; the first line printed is the page's URL.

    Args:
        location: the store (a ``.zarr`` directory, an ``.h5`` file, a URL).
        host: the address to bind (default ``127.0.0.1``: this machine only).
        port: the port (0: any free port; the URL printed says which).
        max_cells: the largest window ``/api/attention`` returns.
        out: where the URL goes (default stdout).
    """
    app = app_for(location, max_cells=max_cells)
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # listening before the URL is printed: a client that reads it may connect at once
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    stream = out or sys.stdout
    print(f"http://{shown}:{bound}/", file=stream, flush=True)
    print(f"serving {os.fspath(location)} read-only; Ctrl-C stops", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])
