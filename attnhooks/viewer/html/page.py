"""One self-contained HTML page: the template, the inlined CSS and JavaScript, the data as JSON.

Nothing in a page refers to anything outside it: no ``src=``, no ``href=`` to a file or a server,
no CDN; the script is attnhooks' own (``assets/``), plain JavaScript drawing on canvases.
"""

from __future__ import annotations

import html
import json
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["asset", "page", "script_json"]


@cache
def asset(name: str) -> str:
    """The text of one file of ``attnhooks/viewer/html/assets/`` (package data)."""
    return resources.files("attnhooks.viewer.html").joinpath("assets", name).read_text(encoding="utf-8")


def script_json(payload: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: no ``<`` (so no ``</script>``) and no
    U+2028/U+2029 survive unescaped."""
    text = json.dumps(payload, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def page(
    payload: dict[str, Any], *, title: str, scripts: tuple[str, ...] = ("views.js",), connect: bool = False
) -> str:
    """The whole document: ``assets/page.html`` with the CSS, the data and ``scripts`` inlined. Its
    content security policy forbids every request, except, with ``connect``, to its own origin (the
    JSON API of ``attnhooks serve``)."""
    body = asset("page.html")
    js = "\n".join(asset(name) for name in scripts)
    for name, text in (
        ("/*CONNECT*/", "; connect-src 'self'" if connect else ""),
        ("/*TITLE*/", html.escape(title)),
        ("/*CSS*/", asset("views.css")),
        ("/*DATA*/", script_json(payload)),
        ("/*JS*/", js.replace("</", "<\\/")),
    ):
        body = body.replace(name, text, 1)
    return body
