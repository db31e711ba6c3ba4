"""``attnhooks verify`` and ``attnhooks repair``: is a store whole, and making it whole again."""

from __future__ import annotations

import argparse
from typing import Any

from attnhooks.errors import StoreCorruptError

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    """Add the ``verify`` and ``repair`` commands to the CLI's subparsers."""
    ver = sub.add_parser(
        "verify",
        help="read every committed step, check every chunk's checksum, list the damaged steps (exit 1 if any)",
    )
    ver.add_argument("store")
    ver.set_defaults(run=_verify)

    rep = sub.add_parser("repair", help="make a store whose writer was killed readable again")
    rep.add_argument("store")
    rep.add_argument(
        "--check", action="store_true", help="change nothing: only verify the store (the same as attnhooks verify)"
    )
    rep.add_argument(
        "--force",
        action="store_true",
        help="repair even while a writer's lease looks live (only for a writer you know is gone)",
    )
    rep.set_defaults(run=_repair)


def _verify(args: argparse.Namespace) -> None:
    from attnhooks.read.verify import verify

    with _progress(f"verify {args.store}") as update:
        report = verify(args.store, progress=update)
    print(report)
    if not report.ok:
        first = report.damage[0]
        steps = tuple(report.damaged_steps)
        raise StoreCorruptError(
            report.location,
            first.array,
            [],
            first.what,
            steps,
            message=f"{report.location} is damaged: step(s) {list(steps) or '-'} (listed above); the other steps "
            "read as before",
        )


def _repair(args: argparse.Namespace) -> None:
    if args.check:
        _verify(args)
        return
    from attnhooks.read.repair import repair

    print(repair(args.store, force=args.force))


class _progress:
    """A tqdm bar on stderr when tqdm is installed and stderr is a terminal; else nothing."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.bar: Any = None

    def __enter__(self) -> Any:
        def update(done: int, total: int) -> None:
            if self.bar is None:
                try:
                    from tqdm.auto import tqdm
                except ImportError:
                    return
                self.bar = tqdm(total=total, desc=self.what, unit="step", disable=None, leave=False)
            self.bar.n = done
            self.bar.refresh()

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
