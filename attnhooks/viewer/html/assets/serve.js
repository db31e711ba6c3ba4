/* attnhooks serve: a zoomable attention map of one head, over the JSON API of the same origin
   (attnhooks/serve/api.py). Low zoom: the pooled overview; cells of a pixel or more: exact 256 x 256
   tiles (format=f32). Uses the helpers of views.js (window.AH). */
(function () {
  "use strict";
  const AH = window.AH;
  const dataEl = document.getElementById("ah-data");
  if (!dataEl || !AH) return;
  const DATA = JSON.parse(dataEl.textContent);
  if (DATA.format !== "attnhooks-serve/1") return;
  const root = document.getElementById("ah-root");
  const TILE = 256, MW = 640, MH = 640, ML = 110, MT = 80, LABEL_PX = 12;
  const S = { sel: {}, call: null, overview: null, summary: null, tiles: new Map(), view: null, row: null,
    requests: 0, drag: null };

  const api = (name, extra) => {
    const p = new URLSearchParams({ ...S.sel, ...(extra || {}) });
    return `api/${name}?${p}`;
  };
  async function getJSON(url) {
    S.requests++;
    const r = await fetch(url), body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    return body;
  }
  const token = (j) => (S.call && j < S.call.tokens.length ? S.call.tokens[j] : String(j));
  const qtoken = (i) => token(S.call.q_start + i);

  // ---- layout --------------------------------------------------------------------------------
  const map = AH.el("canvas", { id: "ah-map", width: ML + MW, height: MT + MH, style: "cursor:crosshair" });
  const hover = AH.el("div", { id: "ah-hover", class: "ah-detail", text: "hover the map" });
  const side = {};
  for (const [k, label] of [["received", "attention received per key"], ["entropy", "row entropy"], ["sink", "sink mass (first keys)"]]) {
    side[k] = AH.el("canvas", { id: `ah-${k}`, width: 320, height: 70 });
    side[k + "Label"] = AH.el("div", { class: "ah-note", text: label });
  }
  const rowPanel = AH.el("div", { id: "ah-row", class: "ah-detail" });
  const bar = AH.el("div", { class: "ah-bar", id: "ah-controls" });
  const status = AH.el("div", { class: "ah-note", id: "ah-status" });
  root.replaceChildren(AH.el("h1", { text: DATA.title }), bar,
    AH.el("div", { class: "ah-cols" }, map, AH.el("div", {}, hover, side.receivedLabel, side.received,
      side.entropyLabel, side.entropy, side.sinkLabel, side.sink, rowPanel)),
    status, AH.el("div", { class: "ah-note", text: "wheel: zoom · drag: pan · click: the query row's strongest keys · exact tiles once a cell is a pixel or more" }));

  function controls(store) {
    const m = store.modules.find((x) => x.name === S.sel.module) || store.modules[0];
    const pick = (id, options, value, key) => {
      const s = AH.select(options, value, (v) => { S.sel[key] = v; if (key === "module") S.sel.head = "0"; open(); });
      s.id = id;
      return AH.el("label", {}, key, s);
    };
    bar.replaceChildren(...[
      pick("ah-module", store.modules.map((x) => [x.name, x.name || "(root)"]), S.sel.module, "module"),
      pick("ah-step", store.steps.map((s) => [s, String(s)]), S.sel.step, "step"),
      pick("ah-head", [...Array(m.heads || 1).keys()].map((h) => [h, String(h)]), S.sel.head, "head"),
      store.ranks.length > 1 ? pick("ah-rank", store.ranks.map((r) => [r, String(r)]), S.sel.rank, "rank") : null,
      AH.el("label", {}, "sample", AH.el("input", { id: "ah-sample", type: "number", min: 0, value: S.sel.sample, style: "width:4em",
        onchange: (ev) => { S.sel.sample = ev.target.value; open(); } })),
      AH.el("button", { text: "fit", onclick: () => { fit(); draw(); } })].filter((x) => x));
  }

  // ---- view geometry -------------------------------------------------------------------------
  function fit() {
    const c = S.call, cpp = Math.max(c.q_len / MH, c.k_len / MW);
    S.view = { x0: 0, y0: 0, cpp };
  }
  const cellAt = (px, py) => [S.view.y0 + (py - MT) * S.view.cpp, S.view.x0 + (px - ML) * S.view.cpp];
  function zoomTo(row, col, cellPx) {  // centre (row, col), cells of cellPx pixels
    const cpp = 1 / cellPx;
    S.view = { cpp, x0: col - (MW / 2) * cpp, y0: row - (MH / 2) * cpp };
    draw();
  }

  // ---- drawing -------------------------------------------------------------------------------
  function paintOverview(ov) {
    const [pq, pk] = ov.shape, c = document.createElement("canvas");
    // one colour scale for the overview and the tiles: square root, up to the 99.9th percentile of the blocks
    const seen = ov.values.flat().filter((v) => v != null).sort((a, b) => a - b);
    S.vmax = Math.max(1e-12, seen.length ? seen[Math.floor(0.999 * (seen.length - 1))] : 1);
    c.width = pk; c.height = pq;
    AH.paint(c, pq, pk, (a, b) => { const v = ov.values[a][b]; return v == null ? AH.MASKED : color(v); }, 1);
    ov.canvas = c;
  }
  const color = (v) => AH.magma(Math.sqrt(v / S.vmax));
  function visibleTiles() {
    const v = S.view, c = S.call;
    const r0 = Math.max(0, Math.floor(v.y0 / TILE)), r1 = Math.min(Math.ceil(c.q_len / TILE), Math.ceil((v.y0 + MH * v.cpp) / TILE));
    const c0 = Math.max(0, Math.floor(v.x0 / TILE)), c1 = Math.min(Math.ceil(c.k_len / TILE), Math.ceil((v.x0 + MW * v.cpp) / TILE));
    const out = [];
    for (let r = r0; r < r1; r++) for (let k = c0; k < c1; k++) out.push([r, k]);
    return out;
  }
  function paintTile(tile) {
    const h = tile.rows[1] - tile.rows[0], w = tile.cols[1] - tile.cols[0], canvas = document.createElement("canvas");
    canvas.width = w; canvas.height = h;
    AH.paint(canvas, h, w, (i, j) => AH.magma(Math.sqrt(tile.values[i * w + j] / S.tileMax)), 1);
    tile.canvas = canvas;
  }
  function loadTile(r, k) {
    const key = `${S.sel.module}|${S.sel.step}|${S.sel.sample}|${S.sel.head}|${S.sel.rank}|${r}|${k}`;
    if (S.tiles.has(key)) return S.tiles.get(key);
    const rows = [r * TILE, Math.min(S.call.q_len, (r + 1) * TILE)], cols = [k * TILE, Math.min(S.call.k_len, (k + 1) * TILE)];
    const tile = { rows, cols, values: null };
    S.tiles.set(key, tile);
    S.requests++;
    fetch(api("attention", { rows: rows.join(":"), cols: cols.join(":"), format: "f32" }))
      .then((resp) => (resp.ok ? resp.arrayBuffer() : resp.json().then((b) => Promise.reject(new Error(b.error)))))
      .then((buf) => {
        tile.values = new Float32Array(buf);
        // exact tiles share their own scale: the 99.9th percentile of the tiles loaded for this head
        const top = Float32Array.from(tile.values).sort()[Math.floor(0.999 * (tile.values.length - 1))];
        if (top > S.tileMax) {
          S.tileMax = top;
          for (const t of S.tiles.values()) if (t.values && t !== tile) paintTile(t);
        }
        paintTile(tile);
        draw();
      })
      .catch((err) => { status.textContent = `tile ${rows}/${cols}: ${err.message}`; S.tiles.delete(key); });
    return tile;
  }
  function draw() {
    if (!S.view || !S.overview) return;
    const ctx = map.getContext("2d"), v = S.view, c = S.call;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, map.width, map.height);
    ctx.save();
    ctx.beginPath(); ctx.rect(ML, MT, MW, MH); ctx.clip();
    ctx.fillStyle = "#eee"; ctx.fillRect(ML, MT, MW, MH);
    ctx.imageSmoothingEnabled = false;
    const ov = S.overview, [bq, bk] = ov.bins;
    ctx.drawImage(ov.canvas, ML - v.x0 / v.cpp, MT - v.y0 / v.cpp, (ov.shape[1] * bk) / v.cpp, (ov.shape[0] * bq) / v.cpp);
    ctx.fillStyle = "#eee";  // beyond the last key / row (the overview's last cells may be partial)
    ctx.fillRect(ML + (c.k_len - v.x0) / v.cpp, MT, MW, MH); ctx.fillRect(ML, MT + (c.q_len - v.y0) / v.cpp, MW, MH);
    let exact = 0;
    if (v.cpp <= 1) {
      for (const [r, k] of visibleTiles()) {
        const t = loadTile(r, k);
        if (!t.canvas) continue;
        exact++;
        ctx.drawImage(t.canvas, ML + (t.cols[0] - v.x0) / v.cpp, MT + (t.rows[0] - v.y0) / v.cpp,
          (t.cols[1] - t.cols[0]) / v.cpp, (t.rows[1] - t.rows[0]) / v.cpp);
      }
    }
    if (S.row != null) {
      ctx.strokeStyle = "#2ca02c"; ctx.lineWidth = 1.5;
      ctx.strokeRect(ML - 1, MT + (S.row - v.y0) / v.cpp, MW + 2, Math.max(1, 1 / v.cpp));
    }
    ctx.restore();
    labels(ctx);
    const shown = `rows ${Math.max(0, Math.floor(v.y0))}–${Math.min(c.q_len, Math.ceil(v.y0 + MH * v.cpp))}, keys ${Math.max(0, Math.floor(v.x0))}–${Math.min(c.k_len, Math.ceil(v.x0 + MW * v.cpp))}`;
    status.textContent = `${c.q_len} x ${c.k_len} · ${shown} · ${v.cpp <= 1 ? `exact tiles (${exact} shown; colour: square root up to ${AH.fmt(S.tileMax)})` : `overview (${ov.source}, ${bq} x ${bk} cells per pixel block)`}`;
    map.dataset.exactTiles = String(exact);
    sides();
  }
  function labels(ctx) {
    const v = S.view, c = S.call, px = 1 / v.cpp;
    ctx.fillStyle = "#333"; ctx.font = "11px sans-serif";
    if (px >= LABEL_PX) {
      for (let i = Math.max(0, Math.floor(v.y0)); i < Math.min(c.q_len, v.y0 + MH * v.cpp); i++) {
        ctx.textAlign = "right"; ctx.fillText(qtoken(i).slice(0, 16), ML - 4, MT + (i - v.y0 + 0.7) * px);
      }
      for (let j = Math.max(0, Math.floor(v.x0)); j < Math.min(c.k_len, v.x0 + MW * v.cpp); j++) {
        ctx.save(); ctx.translate(ML + (j - v.x0 + 0.7) * px, MT - 4); ctx.rotate(-Math.PI / 3);
        ctx.textAlign = "left"; ctx.fillText(token(j).slice(0, 14), 0, 0); ctx.restore();
      }
    } else {
      ctx.textAlign = "right";
      for (let y = 0; y <= MH; y += 128) ctx.fillText(String(Math.round(v.y0 + y * v.cpp)), ML - 4, MT + y + 4);
      ctx.textAlign = "center";
      for (let x = 0; x <= MW; x += 128) ctx.fillText(String(Math.round(v.x0 + x * v.cpp)), ML + x, MT - 6);
    }
  }
  function sides() {
    for (const k of ["received", "entropy", "sink"]) {
      const canvas = side[k], ctx = canvas.getContext("2d"), s = S.summary && S.summary[k];
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      if (!s) { ctx.fillStyle = "#888"; ctx.fillText(S.summary && S.summary.why ? "no summary stored" : "", 4, 14); continue; }
      const vals = s.values, n = vals.length, top = Math.max(1e-12, ...vals.filter((x) => x != null));
      const total = s.axis === "keys" ? S.call.k_len : S.call.q_len;
      const a = s.axis === "keys" ? S.view.x0 : S.view.y0, span = (s.axis === "keys" ? MW : MH) * S.view.cpp;
      ctx.fillStyle = "rgba(255, 200, 0, 0.35)";
      ctx.fillRect((Math.max(0, a) / total) * canvas.width, 0, Math.max(1, (span / total) * canvas.width), canvas.height);
      ctx.strokeStyle = "#4c72b0"; ctx.beginPath();
      vals.forEach((x, i) => { const X = (i / Math.max(1, n - 1)) * canvas.width, Y = canvas.height - 2 - ((x || 0) / top) * (canvas.height - 14); i ? ctx.lineTo(X, Y) : ctx.moveTo(X, Y); });
      ctx.stroke();
      ctx.fillStyle = "#333"; ctx.fillText(`max ${AH.fmt(top)} · ${s.per_point} per point`, 4, 10);
    }
  }

  // ---- interaction -----------------------------------------------------------------------------
  function valueAt(row, col) {
    const r = Math.floor(row / TILE), k = Math.floor(col / TILE);
    const key = `${S.sel.module}|${S.sel.step}|${S.sel.sample}|${S.sel.head}|${S.sel.rank}|${r}|${k}`, t = S.tiles.get(key);
    if (t && t.values) return { exact: true, value: t.values[(row - t.rows[0]) * (t.cols[1] - t.cols[0]) + (col - t.cols[0])] };
    const ov = S.overview, a = Math.floor(row / ov.bins[0]), b = Math.floor(col / ov.bins[1]);
    return { exact: false, value: ov.values[a] ? ov.values[a][b] : null };
  }
  map.addEventListener("mousemove", (ev) => {
    if (S.drag) {
      S.view.x0 = S.drag.x0 - (ev.offsetX - S.drag.px) * S.view.cpp; S.view.y0 = S.drag.y0 - (ev.offsetY - S.drag.py) * S.view.cpp;
      S.drag.moved = true; draw(); return;
    }
    const [fr, fc] = cellAt(ev.offsetX, ev.offsetY), row = Math.floor(fr), col = Math.floor(fc);
    if (ev.offsetX < ML || ev.offsetY < MT || row < 0 || col < 0 || row >= S.call.q_len || col >= S.call.k_len) return;
    const { exact, value } = valueAt(row, col);
    hover.dataset.row = row; hover.dataset.col = col; hover.dataset.source = exact ? "tile" : "overview";
    hover.dataset.value = value == null ? "" : String(value);
    hover.replaceChildren(AH.el("table", {},
      AH.el("tr", {}, AH.el("td", { text: "query" }), AH.el("td", { text: `${row}: ${qtoken(row)}` })),
      AH.el("tr", {}, AH.el("td", { text: "key" }), AH.el("td", { text: `${col}: ${token(col)}` })),
      AH.el("tr", {}, AH.el("td", { text: exact ? "weight (exact)" : "max of its block (overview)" }),
        AH.el("td", { class: "ah-num", id: "ah-hover-value", text: value == null ? "masked" : AH.fmt(value) }))));
  });
  map.addEventListener("mousedown", (ev) => { S.drag = { px: ev.offsetX, py: ev.offsetY, x0: S.view.x0, y0: S.view.y0, moved: false }; });
  window.addEventListener("mouseup", (ev) => {
    const d = S.drag; S.drag = null;
    if (d && !d.moved && ev.target === map && ev.offsetX >= ML && ev.offsetY >= MT) {
      const row = Math.floor(cellAt(ev.offsetX, ev.offsetY)[0]);
      if (row >= 0 && row < S.call.q_len) selectRow(row);
    }
  });
  map.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const [row, col] = cellAt(ev.offsetX, ev.offsetY), f = ev.deltaY > 0 ? 1.25 : 0.8;
    const most = Math.max(S.call.q_len / MH, S.call.k_len / MW) * 1.5;
    const cpp = Math.max(1 / 40, Math.min(most, S.view.cpp * f));
    S.view = { cpp, x0: col - (ev.offsetX - ML) * cpp, y0: row - (ev.offsetY - MT) * cpp };
    draw();
  }, { passive: false });

  async function selectRow(row) {
    S.row = row; draw();
    rowPanel.textContent = "…";
    try {
      const r = await getJSON(api("row", { row, top: 8 }));
      const table = AH.el("table", {}, AH.el("tr", {}, AH.el("th", { text: "head" }), AH.el("th", { text: "key" }), AH.el("th", { text: "weight" })));
      r.heads.forEach((h, i) => h.keys.slice(0, 4).forEach((k, n) => table.append(AH.el("tr", { class: "ah-w", "data-head": i, "data-col": k, "data-value": String(h.weights[n]) },
        AH.el("td", { style: `color:${AH.headColor(i)}`, text: String(i) }), AH.el("td", { text: `${k}: ${token(k)}` }),
        AH.el("td", { class: "ah-num" }, AH.el("span", { style: `display:inline-block;height:8px;width:${Math.round(60 * h.weights[n])}px;background:${AH.headColor(i)};margin-right:4px` }), AH.fmt(h.weights[n]))))));
      const parts = [AH.el("div", { text: `query ${row} "${qtoken(row)}": strongest keys per head` }), table];
      if (r.qk) {
        const qk = AH.el("table", {}, AH.el("tr", {}, AH.el("th", { text: "key" }), AH.el("th", { text: "q·k · scale" }), AH.el("th", { text: "weight" })));
        r.qk.keys.forEach((k, n) => qk.append(AH.el("tr", {}, AH.el("td", { text: `${k}: ${token(k)}` }),
          AH.el("td", { class: "ah-num", text: r.qk.scores[n] == null ? "masked" : r.qk.scores[n].toFixed(4) }),
          AH.el("td", { class: "ah-num", text: AH.fmt(r.heads[r.qk.head].weights[n]) }))));
        parts.push(AH.el("div", { text: `head ${r.qk.head}: scores from the stored q and k (|q| = ${Math.hypot(...r.qk.q).toFixed(3)})` }), qk);
      }
      rowPanel.replaceChildren(...parts);
    } catch (err) { rowPanel.textContent = String(err.message); }
  }

  async function open() {
    S.tiles.clear(); S.row = null; S.tileMax = 1e-12; rowPanel.replaceChildren();
    try {
      S.call = await getJSON(api("call"));
      const [ov, sm] = await Promise.all([getJSON(api("overview", { size: 256 })), getJSON(api("summary", { points: 320 }))]);
      paintOverview(ov);
      S.overview = ov; S.summary = sm.available ? sm : { why: sm.why };
      controls(S.store);
      fit(); draw();
      document.body.dataset.ready = "1";
    } catch (err) { status.textContent = `attnhooks: ${err.message}`; console.error(err); }
  }
  async function start() {
    S.store = await getJSON("api/store");
    const m = S.store.modules[0];
    S.sel = { module: m.name, step: String(S.store.steps[0]), sample: "0", head: "0" };
    if (S.store.ranks.length > 1) S.sel.rank = String(S.store.ranks[0]);
    await open();
  }
  window.ahServe = { S, zoomTo, draw, selectRow, open };
  start();
})();
