/* attnhooks interactive views: head view, model view, query-key view. Plain JavaScript, canvases,
   no library, no network request. Data: the JSON in <script id="ah-data"> (format attnhooks-html/1). */
(function () {
  "use strict";
  const AH = (window.AH = window.AH || {});

  // ---- shared helpers (serve.js uses them too) ----------------------------------------------
  const MAGMA = [[0, 0, 4], [28, 16, 68], [79, 18, 123], [129, 37, 129], [181, 54, 122],
    [229, 80, 100], [251, 135, 97], [254, 194, 135], [252, 253, 191]];
  AH.magma = function (t) {  // t in [0, 1] -> [r, g, b]
    t = Math.max(0, Math.min(1, t)) * (MAGMA.length - 1);
    const i = Math.min(MAGMA.length - 2, Math.floor(t)), f = t - i, a = MAGMA[i], b = MAGMA[i + 1];
    return [a[0] + (b[0] - a[0]) * f, a[1] + (b[1] - a[1]) * f, a[2] + (b[2] - a[2]) * f];
  };
  AH.diverging = function (t) {  // t in [-1, 1]: blue, white, red
    t = Math.max(-1, Math.min(1, t));
    return t < 0 ? [255 + t * 222, 255 + t * 153, 255 + t * 83] : [255 - t * 52, 255 - t * 231, 255 - t * 223];
  };
  AH.MASKED = [191, 211, 230];
  AH.HEADS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#e7969c", "#637939", "#b5cf6b", "#8c6d31", "#843c39"];
  AH.headColor = (h) => AH.HEADS[h % AH.HEADS.length];
  AH.fmt = (v) => (v === 0 ? "0" : Math.abs(v) >= 1e-3 ? v.toFixed(6) : v.toExponential(4));
  AH.el = function (tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c != null) e.append(c);
    return e;
  };
  AH.select = function (options, value, onchange) {
    const s = AH.el("select", { onchange: () => onchange(s.value) });
    options.forEach(([v, label]) => s.append(AH.el("option", { value: String(v), text: label })));
    s.value = String(value);
    return s;
  };
  let tipEl = null;
  AH.tip = function (ev, text) {
    if (!tipEl) { tipEl = AH.el("div", { class: "ah-tip", id: "ah-tip" }); document.body.append(tipEl); }
    if (text == null) { tipEl.style.display = "none"; return; }
    tipEl.textContent = text;
    tipEl.style.display = "block";
    tipEl.style.left = ev.clientX + 14 + "px";
    tipEl.style.top = ev.clientY + 12 + "px";
  };
  const HALF = new Float32Array(65536);
  for (let i = 0; i < 65536; i++) {
    const s = i & 0x8000 ? -1 : 1, e = (i >> 10) & 31, m = i & 1023;
    HALF[i] = e === 0 ? s * m * 2 ** -24 : e === 31 ? (m ? NaN : s * Infinity) : s * (1 + m / 1024) * 2 ** (e - 15);
  }
  AH.unpack = async function (spec) {  // see attnhooks/viewer/html/data.py: byte planes, zlib, base64
    const bin = atob(spec.data), packed = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) packed[i] = bin.charCodeAt(i);
    const stream = new Blob([packed]).stream().pipeThrough(new DecompressionStream("deflate"));
    const planes = new Uint8Array(await new Response(stream).arrayBuffer());
    const size = { float32: 4, float16: 2, uint8: 1 }[spec.dtype], n = planes.length / size;
    const raw = new Uint8Array(planes.length);
    for (let b = 0; b < size; b++) for (let i = 0, o = b * n; i < n; i++) raw[i * size + b] = planes[o + i];
    if (spec.dtype === "float32") return new Float32Array(raw.buffer);
    if (spec.dtype === "uint8") return raw;
    const bits = new Uint16Array(raw.buffer), out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = HALF[bits[i]];
    return out;
  };
  AH.paint = function (canvas, rows, cols, value, pixel) {  // value(i, j) -> [r, g, b]; cells of `pixel` px
    const img = new ImageData(cols, rows);
    for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) {
      const c = value(i, j), o = (i * cols + j) * 4;
      img.data[o] = c[0]; img.data[o + 1] = c[1]; img.data[o + 2] = c[2]; img.data[o + 3] = 255;
    }
    const off = document.createElement("canvas");
    off.width = cols; off.height = rows;
    off.getContext("2d").putImageData(img, 0, 0);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, 0, 0, cols * (pixel || canvas.width / cols), rows * (pixel || canvas.height / rows));
  };

  // ---- the export page ----------------------------------------------------------------------
  const dataEl = document.getElementById("ah-data");
  if (!dataEl) return;
  const DATA = JSON.parse(dataEl.textContent);
  if (DATA.format !== "attnhooks-html/1") return;
  const root = document.getElementById("ah-root");
  const ROW = 16;

  async function load() {
    for (const L of DATA.layers) {
      L.A = await AH.unpack(L.attn);
      [L.H, L.nq, L.nk] = L.attn.shape;
      if (L.q) { L.Q = await AH.unpack(L.q); L.K = await AH.unpack(L.k); L.D = L.q.shape[2]; L.Hkv = L.k.shape[0]; }
      if (L.allowed) L.OK = await AH.unpack(L.allowed);
      if (L.bias) { L.B = await AH.unpack(L.bias); L.Bh = L.bias.shape[0]; }
    }
  }
  const at = (L, h, i, j) => L.A[(h * L.nq + i) * L.nk + j];
  const token = (j) => (j < DATA.tokens.length ? DATA.tokens[j] : String(j));
  const qtoken = (L, i) => token(L.q_start + i);

  const state = { view: DATA.views[0] || "head", layer: 0, heads: null, focus: null, qkHead: 0, query: null };

  function render() {
    const L = DATA.layers[state.layer];
    if (!state.heads) state.heads = new Set(L.nk > 256 ? [0] : [...Array(L.H).keys()]);
    if (state.query == null || state.query >= L.nq) state.query = L.nq - 1;
    root.replaceChildren(
      AH.el("h1", { text: DATA.title }),
      bar(),
      state.view === "model" ? modelView() : state.view === "qk" ? qkView(L) : headView(L),
      AH.el("div", { class: "ah-note", text: note() }),
    );
    document.body.dataset.view = state.view;
  }
  function note() {
    const p = DATA.precision === "float32" ? "weights as stored (float32)" : "weights rounded to float16 (±0.05%)";
    return `${p}; ${DATA.layers.length} module(s), ${DATA.tokens.length} tokens. ${DATA.note || ""}`;
  }
  function bar() {
    const tabs = AH.el("span", { class: "ah-tabs" });
    for (const [v, label] of [["head", "Head view"], ["model", "Model view"], ["qk", "Query · key"]]) {
      if (!DATA.views.includes(v)) continue;
      tabs.append(AH.el("button", { class: state.view === v ? "ah-on" : "", "data-view": v, text: label,
        onclick: () => { state.view = v; render(); } }));
    }
    const layers = DATA.layers.map((L, i) => [i, `${i}: ${L.name}`]);
    const pick = AH.select(layers, state.layer, (v) => { state.layer = +v; state.heads = null; state.focus = null; render(); });
    pick.id = "ah-layer";
    return AH.el("div", { class: "ah-bar" }, tabs, state.view === "model" ? null : AH.el("label", {}, "module", pick));
  }

  // ---- head view: BertViz-style lines, one colour per head ---------------------------------
  function headView(L) {
    const heads = AH.el("div", { class: "ah-heads" });
    for (let h = 0; h < L.H; h++) {
      const on = state.heads.has(h);
      heads.append(AH.el("label", { class: on ? "" : "ah-off", style: `background:${AH.headColor(h)}`, "data-head": h,
        text: `head ${h}`, onclick: () => { on ? state.heads.delete(h) : state.heads.add(h); render(); } }));
    }
    heads.append(AH.el("button", { text: "all", onclick: () => { state.heads = new Set([...Array(L.H).keys()]); render(); } }));
    heads.append(AH.el("button", { text: "none", onclick: () => { state.heads = new Set(); render(); } }));
    const rows = Math.max(L.nq, L.nk), canvas = AH.el("canvas", { id: "ah-lines", width: 220, height: rows * ROW });
    const detail = AH.el("div", { class: "ah-detail", id: "ah-detail", text: "hover a token to see its weights" });
    const column = (n, side) => {
      const col = AH.el("div", { class: "ah-tokens" });
      for (let i = 0; i < n; i++) {
        const t = AH.el("div", { class: `ah-tok ah-${side}`, style: `height:${ROW}px`, "data-index": i,
          text: side === "left" ? qtoken(L, i) : token(i) });
        t.addEventListener("mouseenter", () => { state.focus = { side, i }; lines(L, canvas); weights(L, side, i, detail); t.classList.add("ah-hot"); });
        t.addEventListener("mouseleave", () => { state.focus = null; lines(L, canvas); t.classList.remove("ah-hot"); });
        col.append(t);
      }
      return col;
    };
    lines(L, canvas);
    return AH.el("div", {}, heads,
      AH.el("div", { class: "ah-cols" },
        AH.el("div", { class: "ah-headview" }, column(L.nq, "left"), canvas, column(L.nk, "right")), detail));
  }
  function lines(L, canvas) {
    const ctx = canvas.getContext("2d"), W = canvas.width, f = state.focus;
    ctx.clearRect(0, 0, W, canvas.height);
    const floor = f ? 0.002 : L.nk > 256 ? 0.05 : 0.01;
    for (const h of state.heads) {
      ctx.strokeStyle = AH.headColor(h);
      ctx.lineWidth = 1.5;
      const i0 = f && f.side === "left" ? f.i : 0, i1 = f && f.side === "left" ? f.i + 1 : L.nq;
      for (let i = i0; i < i1; i++) {
        const j0 = f && f.side === "right" ? f.i : 0, j1 = f && f.side === "right" ? f.i + 1 : L.nk;
        for (let j = j0; j < j1; j++) {
          const w = at(L, h, i, j);
          if (!(w > floor)) continue;
          ctx.globalAlpha = Math.min(1, w / Math.sqrt(state.heads.size));
          ctx.beginPath(); ctx.moveTo(0, i * ROW + ROW / 2); ctx.lineTo(W, j * ROW + ROW / 2); ctx.stroke();
        }
      }
    }
    ctx.globalAlpha = 1;
  }
  function weights(L, side, i, detail) {  // the hovered token's strongest weights per head, exact
    const table = AH.el("table", {}, AH.el("tr", {}, AH.el("th", { text: "head" }),
      AH.el("th", { text: side === "left" ? "key" : "query" }), AH.el("th", { text: "weight" })));
    for (const h of state.heads) {
      const n = side === "left" ? L.nk : L.nq, order = [];
      for (let j = 0; j < n; j++) order.push(j);
      const w = (j) => (side === "left" ? at(L, h, i, j) : at(L, h, j, i));
      order.sort((a, b) => w(b) - w(a));
      for (const j of order.slice(0, 6)) {
        const [row, col] = side === "left" ? [i, j] : [j, i];
        table.append(AH.el("tr", { class: "ah-w", "data-head": h, "data-row": row, "data-col": col, "data-value": String(w(j)) },
          AH.el("td", { style: `color:${AH.headColor(h)}`, text: String(h) }),
          AH.el("td", { text: side === "left" ? token(j) : qtoken(L, j) }),
          AH.el("td", { class: "ah-num", text: AH.fmt(w(j)) })));
      }
    }
    const what = side === "left" ? `query ${i} "${qtoken(L, i)}"` : `key ${i} "${token(i)}"`;
    detail.replaceChildren(AH.el("div", { text: `${L.name}, ${what}` }), table);
  }

  // ---- model view: the layer x head grid; click a cell to open that head -------------------
  function modelView() {
    const H = Math.max(...DATA.layers.map((L) => L.H));
    const size = Math.max(40, Math.min(100, Math.floor(900 / H)));
    const grid = AH.el("div", { class: "ah-grid", id: "ah-grid", style: `grid-template-columns: 70px repeat(${H}, ${size + 2}px)` });
    grid.append(AH.el("div", {}));
    for (let h = 0; h < H; h++) grid.append(AH.el("div", { class: "ah-lab", text: `head ${h}` }));
    DATA.layers.forEach((L, l) => {
      grid.append(AH.el("div", { class: "ah-lab", text: L.name.length > 12 ? `layer ${l}` : L.name, title: L.name }));
      for (let h = 0; h < H; h++) {
        if (h >= L.H) { grid.append(AH.el("div", {})); continue; }
        const c = AH.el("canvas", { width: size, height: size, "data-layer": l, "data-head": h });
        thumbnail(L, h, c);
        c.addEventListener("mousemove", (ev) => {
          const i = Math.min(L.nq - 1, Math.floor((ev.offsetY / size) * L.nq)), j = Math.min(L.nk - 1, Math.floor((ev.offsetX / size) * L.nk));
          AH.tip(ev, `${L.name} head ${h}\n${qtoken(L, i)} → ${token(j)}: ${AH.fmt(at(L, h, i, j))}`);
        });
        c.addEventListener("mouseleave", (ev) => AH.tip(ev, null));
        c.addEventListener("click", (ev) => { AH.tip(ev, null); state.view = "head"; state.layer = l; state.heads = new Set([h]); render(); });
        grid.append(c);
      }
    });
    return grid;
  }
  function thumbnail(L, h, canvas) {  // max-pooled to the canvas' pixels, square-root colour scale
    const m = Math.min(L.nq, canvas.width), n = Math.min(L.nk, canvas.width);
    const bi = L.nq / m, bj = L.nk / n;
    AH.paint(canvas, m, n, (a, b) => {
      let v = 0;
      for (let i = Math.floor(a * bi); i < Math.floor((a + 1) * bi); i++)
        for (let j = Math.floor(b * bj); j < Math.floor((b + 1) * bj); j++) v = Math.max(v, at(L, h, i, j));
      return AH.magma(Math.sqrt(v));
    });
  }

  // ---- query-key view: q, k, q⊙k, scores and softmax of one query, recomputed ---------------
  function qkRow(L, h, i) {
    const D = L.D, kh = Math.floor(h / (L.H / L.Hkv)), q = L.Q.subarray((h * L.nq + i) * D, (h * L.nq + i + 1) * D);
    const prod = new Float64Array(L.nk * D), score = new Float64Array(L.nk);
    let top = -Infinity;
    for (let j = 0; j < L.nk; j++) {
      let s = 0;
      for (let d = 0; d < D; d++) { const p = q[d] * L.K[(kh * L.nk + j) * D + d]; prod[j * D + d] = p; s += p; }
      s *= L.scale;
      if (L.softcap) s = Math.tanh(s / L.softcap) * L.softcap;
      if (L.B) s += L.B[((L.Bh > 1 ? h : 0) * L.nq + i) * L.nk + j];
      if (L.OK && !L.OK[i * L.nk + j]) s = -Infinity;
      score[j] = s; top = Math.max(top, s);
    }
    let sum = 0;
    const prob = new Float64Array(L.nk);
    for (let j = 0; j < L.nk; j++) { prob[j] = score[j] === -Infinity ? 0 : Math.exp(score[j] - top); sum += prob[j]; }
    let diff = 0;
    for (let j = 0; j < L.nk; j++) { prob[j] /= sum; diff = Math.max(diff, Math.abs(prob[j] - at(L, h, i, j))); }
    return { q, prod, score, prob, diff };
  }
  function qkView(L) {
    if (!L.Q) return AH.el("div", { class: "ah-err", text: `${L.name}: this file holds no q and k for this module (capture with record=("q", "k"), and export with qk=True)` });
    const h = Math.min(state.qkHead, L.H - 1), i = state.query, r = qkRow(L, h, i);
    const heads = AH.select([...Array(L.H).keys()].map((x) => [x, `head ${x}`]), h, (v) => { state.qkHead = +v; render(); });
    const queries = AH.select([...Array(L.nq).keys()].map((x) => [x, `${x}: ${qtoken(L, x)}`]), i, (v) => { state.query = +v; render(); });
    heads.id = "ah-qk-head"; queries.id = "ah-qk-query";
    const D = L.D, cw = Math.max(2, Math.min(8, Math.floor(256 / D))), rh = L.nk > 128 ? Math.max(2, Math.floor(2048 / L.nk)) : ROW;
    const bars = 140, gap = 12, W = 2 * D * cw + 2 * bars + 3 * gap;
    const canvas = AH.el("canvas", { id: "ah-qk", width: W, height: L.nk * rh + 24 });
    const ctx = canvas.getContext("2d");
    let kmax = 1e-12, pmax = 1e-12, smax = 1e-12, smin = 0;
    for (let j = 0; j < L.nk; j++) {
      if (r.score[j] > -Infinity) { smax = Math.max(smax, r.score[j]); smin = Math.min(smin, r.score[j]); }
      for (let d = 0; d < D; d++) { kmax = Math.max(kmax, Math.abs(L.K[(Math.floor(h / (L.H / L.Hkv)) * L.nk + j) * D + d])); pmax = Math.max(pmax, Math.abs(r.prod[j * D + d])); }
    }
    const kh = Math.floor(h / (L.H / L.Hkv));
    const y0 = 24, panel = document.createElement("canvas");
    panel.width = D * cw; panel.height = L.nk * rh;
    AH.paint(panel, L.nk, D, (j, d) => AH.diverging(L.K[(kh * L.nk + j) * D + d] / kmax), cw);
    ctx.drawImage(panel, 0, y0);
    panel.getContext("2d").clearRect(0, 0, panel.width, panel.height);
    AH.paint(panel, L.nk, D, (j, d) => (L.OK && !L.OK[i * L.nk + j] ? AH.MASKED : AH.diverging(r.prod[j * D + d] / pmax)), cw);
    ctx.drawImage(panel, D * cw + gap, y0);
    ctx.font = "11px sans-serif"; ctx.fillStyle = "#333";
    const xs = 2 * D * cw + 2 * gap, xp = xs + bars + gap, zero = xs + (bars * -smin) / (smax - smin || 1);
    ctx.fillText("k", 0, 12); ctx.fillText("q ⊙ k", D * cw + gap, 12); ctx.fillText("score", xs, 12); ctx.fillText("softmax", xp, 12);
    for (let j = 0; j < L.nk; j++) {
      const y = y0 + j * rh;
      if (r.score[j] > -Infinity) {
        ctx.fillStyle = "#4c72b0";
        const x = xs + (bars * (r.score[j] - smin)) / (smax - smin || 1);
        ctx.fillRect(Math.min(zero, x), y + 1, Math.abs(x - zero) || 1, Math.max(1, rh - 2));
      }
      ctx.fillStyle = "#dd8452"; ctx.fillRect(xp, y + 1, bars * r.prob[j], Math.max(1, rh - 2));
      ctx.fillStyle = "#000"; ctx.fillRect(xp + bars * at(L, h, i, j), y, 1.5, rh);
    }
    const detail = AH.el("div", { class: "ah-detail", id: "ah-qk-detail", text: "hover a key row" });
    canvas.addEventListener("mousemove", (ev) => {
      const j = Math.floor((ev.offsetY - y0) / rh);
      if (j < 0 || j >= L.nk) return;
      const stored = at(L, h, i, j);
      detail.replaceChildren(AH.el("table", {},
        AH.el("tr", {}, AH.el("td", { text: "key" }), AH.el("td", { text: `${j}: ${token(j)}` })),
        AH.el("tr", {}, AH.el("td", { text: "q·k · scale" }), AH.el("td", { class: "ah-num", text: r.score[j] === -Infinity ? "masked" : r.score[j].toFixed(5) })),
        AH.el("tr", {}, AH.el("td", { text: "softmax (recomputed)" }), AH.el("td", { class: "ah-num", text: AH.fmt(r.prob[j]) })),
        AH.el("tr", { class: "ah-w", "data-head": h, "data-row": i, "data-col": j, "data-value": String(stored) },
          AH.el("td", { text: "stored weight" }), AH.el("td", { class: "ah-num", text: AH.fmt(stored) }))));
    });
    const summary = AH.el("div", { id: "ah-qk-summary", "data-diff": String(r.diff),
      text: `query ${i} "${qtoken(L, i)}", head ${h}: max |recomputed softmax − stored| = ${r.diff.toExponential(2)}` });
    return AH.el("div", { class: "ah-qk" }, AH.el("div", { class: "ah-bar" }, heads, queries), summary,
      AH.el("div", { class: "ah-cols" }, canvas, detail));
  }

  load().then(() => {
    render();
    window.attnhooks = { state, render, data: DATA, renderedAt: performance.now() };
    document.body.dataset.ready = "1";
  }).catch((err) => {
    root.replaceChildren(AH.el("div", { class: "ah-err", text: `attnhooks: could not read the data: ${err}` }));
    console.error(err);
  });
})();
