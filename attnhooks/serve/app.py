"""The web app of ``attnhooks serve``: starlette routes over :class:`~attnhooks.serve.api.Api`.

Two kinds of route only: ``/`` (the page, built in memory: its script and styles inline, nothing
read from disk) and ``/api/<endpoint>`` (JSON). Nothing else is served: no file of the store or of
the machine is reachable by URL, every method but ``GET`` / ``HEAD`` is refused, and any other path
is a 404 JSON error. ``format=f32`` on ``/api/attention`` answers the same window as raw
little-endian float32 (headers ``X-Rows`` / ``X-Cols``), which the page uses for its tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from attnhooks.serve.api import Api

__all__ = ["make_app"]


def make_app(api: Api, *, title: str) -> Any:
    """The starlette application serving ``api`` and the viewer page."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    from attnhooks.viewer.html.page import page

    html = page(
        {"format": "attnhooks-serve/1", "title": title}, title=title, scripts=("views.js", "serve.js"), connect=True
    )
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    encode = _numpy_json()

    async def index(request: Request) -> Response:
        return HTMLResponse(html, headers=headers)

    async def endpoint(request: Request) -> Response:
        name = request.path_params["name"]
        params = dict(request.query_params)
        binary = name == "attention" and params.pop("format", "json") == "f32"
        fast = name == "attention" and not binary and encode is not None  # the window as an array
        status, body = await run_in_threadpool(lambda: api.handle(name, params, binary=binary or fast))
        if binary and status == 200:
            data = np.ascontiguousarray(body["array"], dtype="<f4").tobytes()
            extra = {"X-Rows": f"{body['rows'][0]}:{body['rows'][1]}", "X-Cols": f"{body['cols'][0]}:{body['cols'][1]}"}
            return Response(data, media_type="application/octet-stream", headers={**headers, **extra})
        if fast and status == 200 and encode is not None:  # (float64: each float32 exactly, as json does)
            values = body.pop("array").astype(np.float64)
            return Response(encode({**body, "values": values}), media_type="application/json", headers=headers)
        return JSONResponse(body, status_code=status, headers=headers)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        return JSONResponse(
            {
                "error": f"{request.method} {request.url.path}: not found here (status {status}); "
                "the viewer is / and the JSON API /api/store, /api/call, /api/attention, "
                "/api/overview, /api/summary, /api/row (GET)"
            },
            status_code=status,
        )

    async def failed(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, status_code=500)

    routes = [Route("/", index, methods=["GET"]), Route("/api/{name}", endpoint, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found, 500: failed})


def _numpy_json() -> Callable[[Any], bytes] | None:
    """``orjson.dumps`` with numpy arrays (~10x faster than ``json`` on a 256 x 256 window, whose
    65,536 floats cost ~100 ms as Python floats), or None without orjson (``attnhooks[serve]``)."""
    try:
        import orjson
    except ImportError:
        return None
    return lambda body: orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
