"""``attnhooks html STORE -o out.html``: the interactive views of one step as one self-contained file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]

VIEWS = ("head", "model", "qk")


def add_parser(sub: Any) -> None:
    """Add the ``html`` command to the ``attnhooks`` subparsers ``sub``."""
    p = sub.add_parser(
        "html",
        help="write the interactive head / model / query-key views of a store into one self-contained .html",
        description="One .html file with all its JavaScript and data inside: it opens from disk in any modern "
        "browser and makes no network request. The first --view is the one opened.",
    )
    p.add_argument("store")
    p.add_argument("-o", "--output", required=True, type=Path, help="FILE.html")
    p.add_argument(
        "--view",
        action="append",
        type=_view,
        help="head, model or qk; repeat (or comma-separate) for several, the first opened (default: all three)",
    )
    p.add_argument("--module", action="append", help="module name, glob or layer index; repeat (default: every layer)")
    p.add_argument("--step", type=int, help="step id (default: the first stored)")
    p.add_argument("--sample", type=int, default=0, help="sample of the batch (default: 0)")
    p.add_argument("--call", type=int, default=0, help="call of the module within the step (default: 0)")
    p.add_argument("--rank", type=int, help="rank of a store written under torch.distributed (default: the lowest)")
    p.add_argument(
        "--method",
        choices=("auto", "stored", "reconstructed"),
        default="auto",
        help="read stored attention or rebuild it from q/k/lse (default: auto)",
    )
    p.add_argument(
        "--precision",
        choices=("auto", "float32", "float16"),
        default="auto",
        help="weights in the file: float32 as stored, or float16 (half the size); auto: float32 up to 32 MiB",
    )
    p.add_argument("--max-tokens", type=int, default=2048, help="refuse longer calls (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from attnhooks.errors import ViewError
    from attnhooks.read.store import open_store
    from attnhooks.viewer.html import store_html

    if args.output.suffix.lower() not in (".html", ".htm"):
        raise ViewError(f"-o {args.output}: the file must end in .html")
    st = open_store(args.store)
    if args.rank is not None:
        st = st.rank(args.rank)
    views = [v for group in (args.view or [list(VIEWS)]) for v in group]
    modules = None if not args.module else [st.resolve(int(m) if _is_int(m) else m) for m in args.module]
    if args.module and len(args.module) == 1 and not _is_int(args.module[0]):
        modules = st.select(args.module[0])  # a glob may name several
    view = store_html(
        st,
        modules,
        args.step,
        args.sample,
        args.call,
        views=tuple(dict.fromkeys(views)),
        method=args.method,
        precision=args.precision,
        max_tokens=args.max_tokens,
    )
    path = view.save(args.output)
    print(f"{path} ({view.nbytes / 2**20:.2f} MiB, {len(view.data.layers)} module(s), {view.data.dtype()})")


def _view(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in VIEWS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: a view is one of {', '.join(VIEWS)}")
    return names


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()
