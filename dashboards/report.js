/* trainwatch run dashboard. Vanilla JS, SVG and canvas; no network. Every string from the payload goes in
   through textContent, createTextNode or setAttribute (never as markup). */
(function () {
  "use strict";
  const SVGNS = "http://www.w3.org/2000/svg";
  const PAL = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#eeca3b", "#9d755d", "#ff9da6", "#bab0ac"];
  const VIEWS = ["overview", "dynamics", "gradients", "activations", "cam", "landscape", "compare"];
  const SEVERITIES = ["critical", "warning", "info"];
  const sevRank = (s) => { const i = SEVERITIES.indexOf(S(s)); return i < 0 ? 3 : i; };

  // ---- safe accessors
  const isObj = (x) => x !== null && typeof x === "object" && !Array.isArray(x);
  const O = (x) => (isObj(x) ? x : {});
  const A = (x) => (Array.isArray(x) ? x : []);
  const N = (x) => (typeof x === "number" && isFinite(x) ? x : null);
  const S = (x) => (x == null ? "" : typeof x === "string" ? x : typeof x === "object" ? JSON.stringify(x) : String(x));
  const clamp = (v, lo, hi) => Math.max(lo, Math.min(hi, v));
  const log10 = (v) => (v > 0 ? Math.log10(v) : null);

  // ---- DOM builders (text only through text nodes / attributes)
  function add(e, kids) {
    if (kids == null || kids === false) return e;
    if (Array.isArray(kids)) { for (const k of kids) add(e, k); return e; }
    e.append(kids instanceof Node ? kids : document.createTextNode(String(kids)));
    return e;
  }
  function attrs(e, a) {
    for (const k in a || {}) {
      const v = a[k];
      if (v == null || v === false) continue;
      if (k === "text") e.textContent = String(v);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    return e;
  }
  const h = (tag, a, kids) => add(attrs(document.createElement(tag), a), kids);
  const sv = (tag, a, kids) => add(attrs(document.createElementNS(SVGNS, tag), a), kids);
  const noData = (msg) => h("p", { class: "nodata", text: msg || "no data" });

  // ---- formatting
  function fmt(v, d) {
    v = N(v);
    if (v === null) return "–";
    const a = Math.abs(v);
    if (Number.isInteger(v) && a < 1e15) return v.toLocaleString("en-US");
    if (a >= 1e5 || a < 1e-3) return v.toExponential(d == null ? 2 : d).replace("e+", "e");
    return String(+v.toPrecision(d == null ? 4 : d));
  }
  function tick(v) {
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e12 || a < 1e-3) return (+v.toPrecision(2)).toExponential().replace("e+", "e");
    if (a >= 1e4) for (const [d, u] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) if (a >= d) return +(v / d).toPrecision(3) + u;
    return String(+v.toPrecision(3));
  }
  function dur(s) {
    s = N(s);
    if (s === null) return "–";
    if (s < 60) return s.toFixed(1) + " s";
    const hh = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.floor(s % 60);
    return (hh ? hh + "h " + String(m).padStart(2, "0") : m) + "m " + String(sec).padStart(2, "0") + "s";
  }
  const pct = (v) => (N(v) === null ? "–" : (100 * v).toFixed(1) + "%");
  const evidenceText = (v) => (typeof v === "number" ? fmt(v) : S(v).slice(0, 300));

  // ---- colour maps
  function lut(stops) {
    const c = stops.map((s) => [1, 3, 5].map((i) => parseInt(s.slice(i, i + 2), 16)));
    const out = [];
    for (let i = 0; i < 256; i++) {
      const t = (i / 255) * (c.length - 1), k = Math.min(c.length - 2, Math.floor(t)), f = t - k;
      out.push(c[k].map((v, j) => Math.round(v + (c[k + 1][j] - v) * f)));
    }
    return out;
  }
  const VIRIDIS = lut(["#440154", "#482878", "#3e4a89", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"]);
  const INFERNO = lut(["#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60", "#cf4446", "#ed6925", "#fb9b06", "#f7d13d", "#fcffa4"]);
  const NA_RGB = [214, 217, 224];
  const rgb = (c) => "rgb(" + c.join(",") + ")";
  const colorAt = (L, t) => L[clamp(Math.round(t * 255), 0, 255) | 0];

  // ---- canvas, tooltip, legend helpers
  function makeCanvas(w, ht, cls) {
    const dpr = window.devicePixelRatio || 1;
    const c = h("canvas", { class: cls, width: Math.round(w * dpr), height: Math.round(ht * dpr) });
    c.style.width = w + "px";
    c.style.height = ht + "px";
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.font = "11px system-ui, sans-serif";
    return { c, ctx, dpr };
  }
  function makeTip(wrap) {
    const t = h("div", { class: "tip", hidden: true });
    wrap.append(t);
    return {
      show(lines, x, y) {
        t.replaceChildren(...lines.map((l) => h("div", { text: l })));
        t.hidden = false;
        const maxX = Math.max(0, wrap.clientWidth - t.offsetWidth - 4);
        t.style.left = (x + 14 > maxX ? Math.max(0, x - t.offsetWidth - 10) : x + 14) + "px";
        t.style.top = Math.max(0, y - 12) + "px";
      },
      hide() { t.hidden = true; },
    };
  }
  function colorBar(L, lo, hi, label, f) {
    const { c, ctx } = makeCanvas(160, 10, "legend colorbar");
    for (let i = 0; i < 160; i++) { ctx.fillStyle = rgb(colorAt(L, i / 159)); ctx.fillRect(i, 0, 1, 10); }
    return h("div", { class: "cbar" }, [h("span", { text: f(lo) }), c, h("span", { text: f(hi) }), h("span", { text: label || "" })]);
  }
  function truncate(ctx, text, w) {
    if (ctx.measureText(text).width <= w) return text;
    let lo = 0, hi = text.length;
    while (lo < hi) { const m = (lo + hi + 1) >> 1; if (ctx.measureText("…" + text.slice(text.length - m)).width <= w) lo = m; else hi = m - 1; }
    return "…" + text.slice(text.length - lo);
  }

  // ---- ticks
  function linTicks(lo, hi, n) {
    const span = hi - lo;
    if (!(span > 0)) return [lo];
    const raw = span / (n || 5), p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
    const st = (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * p, out = [];
    for (let v = Math.ceil(lo / st) * st; v <= hi + st * 1e-9 && out.length < 50; v += st) out.push(Math.abs(v) < st * 1e-9 ? 0 : +v.toPrecision(12));
    return out;
  }
  function logTicks(lo, hi) {
    const a = Math.floor(lo), b = Math.ceil(hi), every = Math.max(1, Math.ceil((b - a) / 6));
    let out = [];
    for (let k = a; k <= b; k += every) if (k >= lo - 1e-9 && k <= hi + 1e-9) out.push(k);
    if (b - a <= 2) for (let k = a; k <= b; k++) for (const m of [2, 5]) { const v = k + Math.log10(m); if (v >= lo && v <= hi) out.push(v); }
    if (out.length < 2) out = linTicks(Math.pow(10, lo), Math.pow(10, hi), 4).filter((v) => v > 0).map(Math.log10);
    return out.sort((x, y) => x - y);
  }

  // ---- SVG line chart
  // o: {w, h, title, series: [{name, x, y, color, dash}], logY, band: [lo, hi], guides: [y], xName}
  function lineChart(o) {
    const w = Math.max(240, o.w | 0), ht = o.h || 210, logY = !!o.logY, T = (v) => (logY ? log10(v) : v);
    const M = { l: 56, r: 14, t: o.title ? 24 : 10, b: 26 }, pw = w - M.l - M.r, ph = ht - M.t - M.b;
    const ser = [];
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    A(o.series).forEach((sr, k) => {
      const xs = A(sr.x), ys = A(sr.y), n = Math.min(xs.length, ys.length), px = [], py = [];
      let lo = Infinity, hi = -Infinity, last = null;
      for (let i = 0; i < n; i++) {
        const x = N(xs[i]), raw = N(ys[i]);
        if (x === null) continue;
        const y = raw === null ? null : T(raw);
        px.push(x); py.push(y);
        x0 = Math.min(x0, x); x1 = Math.max(x1, x);
        if (y === null) continue;
        y0 = Math.min(y0, y); y1 = Math.max(y1, y);
        lo = Math.min(lo, raw); hi = Math.max(hi, raw); last = raw;
      }
      if (last !== null) ser.push({ name: S(sr.name), color: sr.color || PAL[k % PAL.length], dash: sr.dash, x: px, y: py, lo, hi, last });
    });
    if (!ser.length) return h("div", { class: "chart-wrap" }, noData((o.title ? o.title + ": " : "") + "no data" + (logY ? " (log y needs positive values)" : "")));
    const extra = A(o.band).concat(A(o.guides)).map((v) => (N(v) === null ? null : T(v))).filter((v) => v !== null);
    for (const v of extra) { y0 = Math.min(y0, v); y1 = Math.max(y1, v); }
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { const p = logY ? 0.5 : Math.abs(y0) * 0.1 || 1; y0 -= p; y1 += p; } else { const p = (y1 - y0) * 0.05; y0 -= p; y1 += p; }
    const X = (x) => M.l + ((x - x0) / (x1 - x0)) * pw, Y = (y) => M.t + ph - ((y - y0) / (y1 - y0)) * ph;
    const svg = sv("svg", { class: "chart line-chart", width: w, height: ht, viewBox: "0 0 " + w + " " + ht });
    if (o.title) svg.append(sv("text", { class: "ttl", x: M.l, y: 15, text: o.title }));
    if (o.band && extra.length >= 2) {
      const a = T(o.band[0]), b = T(o.band[1]);
      if (a !== null && b !== null) svg.append(sv("rect", { x: M.l, y: Y(Math.max(a, b)), width: pw, height: Math.abs(Y(a) - Y(b)), fill: "#54a24b", "fill-opacity": 0.12 }));
    }
    for (const t of logY ? logTicks(y0, y1) : linTicks(y0, y1, 5)) {
      const y = Y(t);
      svg.append(sv("line", { x1: M.l, x2: M.l + pw, y1: y, y2: y, stroke: "#eceef3" }));
      svg.append(sv("text", { x: M.l - 5, y: y + 3, "text-anchor": "end", text: tick(logY ? Math.pow(10, t) : t) }));
    }
    for (const t of linTicks(x0, x1, Math.max(2, Math.floor(pw / 90)))) {
      const x = X(t);
      svg.append(sv("line", { x1: x, x2: x, y1: M.t + ph, y2: M.t + ph + 4, stroke: "#9aa0ad" }));
      svg.append(sv("text", { x, y: M.t + ph + 15, "text-anchor": "middle", text: tick(t) }));
    }
    for (const g of A(o.guides)) {
      const v = N(g) === null ? null : T(g);
      if (v !== null) svg.append(sv("line", { x1: M.l, x2: M.l + pw, y1: Y(v), y2: Y(v), stroke: "#54a24b", "stroke-dasharray": "5 4" }));
    }
    svg.append(sv("path", { d: "M" + M.l + " " + M.t + "V" + (M.t + ph) + "H" + (M.l + pw), fill: "none", stroke: "#9aa0ad" }));
    for (const sr of ser) {
      let d = "", run = 0;
      for (let i = 0; i < sr.x.length; i++) {
        if (sr.y[i] === null) { if (run === 1) d += "h0.6"; run = 0; continue; }
        d += (run ? "L" : "M") + X(sr.x[i]).toFixed(1) + " " + Y(sr.y[i]).toFixed(1);
        run++;
      }
      if (run === 1) d += "h0.6";
      svg.append(sv("path", { d, fill: "none", stroke: sr.color, "stroke-width": 1.5, "stroke-linejoin": "round", "stroke-linecap": "round", "stroke-dasharray": sr.dash }));
    }
    const wrap = h("div", { class: "chart-wrap" }, svg);
    wrap.append(h("div", { class: "legend" }, ser.map((sr) => {
      const sw = h("i"); sw.style.background = sr.color;
      return h("span", null, [sw, sr.name + "  last " + fmt(sr.last) + " · min " + fmt(sr.lo) + " · max " + fmt(sr.hi)]);
    })));
    const tip = makeTip(wrap), cursor = sv("line", { y1: M.t, y2: M.t + ph, stroke: "#9aa0ad", visibility: "hidden" });
    const dots = ser.map((sr) => sv("circle", { r: 3, fill: sr.color, visibility: "hidden" }));
    svg.append(cursor, ...dots);
    svg.addEventListener("mousemove", (e) => {
      const r = svg.getBoundingClientRect(), mx = e.clientX - r.left, my = e.clientY - r.top;
      if (mx < M.l || mx > M.l + pw) { tip.hide(); cursor.setAttribute("visibility", "hidden"); dots.forEach((d) => d.setAttribute("visibility", "hidden")); return; }
      const xv = x0 + ((mx - M.l) / pw) * (x1 - x0), lines = [];
      let bx = null;
      ser.forEach((sr, k) => {
        let best = -1, bd = Infinity;
        for (let i = 0; i < sr.x.length; i++) if (sr.y[i] !== null && Math.abs(sr.x[i] - xv) < bd) { bd = Math.abs(sr.x[i] - xv); best = i; }
        if (best < 0) return;
        if (bx === null) bx = sr.x[best];
        const v = logY ? Math.pow(10, sr.y[best]) : sr.y[best];
        lines.push(sr.name + ": " + fmt(v, 4) + (sr.x[best] !== bx ? " (" + (o.xName || "step") + " " + fmt(sr.x[best]) + ")" : ""));
        attrs(dots[k], { cx: X(sr.x[best]), cy: Y(sr.y[best]), visibility: "visible" });
      });
      if (bx === null) return;
      attrs(cursor, { x1: X(bx), x2: X(bx), visibility: "visible" });
      tip.show([(o.xName || "step") + " " + fmt(bx)].concat(lines), mx, my);
    });
    svg.addEventListener("mouseleave", () => { tip.hide(); cursor.setAttribute("visibility", "hidden"); dots.forEach((d) => d.setAttribute("visibility", "hidden")); });
    return wrap;
  }

  // ---- canvas heatmap
  // o: {w, rows: [label] top to bottom, cols: [step], value(r, c) -> number|null, lo, hi, lut, marks: [{r, c, title}],
  //     tipValue(v) -> str, labelW, rowH, maxH, smooth, cls}
  function heatmap(o) {
    const R = o.rows.length, C = o.cols.length, lw = o.labelW || 150;
    const M = { l: lw, r: 10, t: 6, b: o.xName ? 32 : 26 }, pw = Math.max(60, (o.w | 0) - M.l - M.r);
    const rh = o.rowH || clamp(Math.floor((o.maxH || 420) / R), 3, 22), ph = rh * R, cw = pw / C;
    const { c, ctx } = makeCanvas(M.l + pw + M.r, M.t + ph + M.b, "chart heatmap " + (o.cls || ""));
    const off = document.createElement("canvas");
    off.width = C; off.height = R;
    const octx = off.getContext("2d"), img = octx.createImageData(C, R), span = o.hi - o.lo || 1;
    for (let r = 0; r < R; r++) for (let k = 0; k < C; k++) {
      const v = o.value(r, k), col = v === null ? NA_RGB : colorAt(o.lut, (v - o.lo) / span), p = 4 * (r * C + k);
      img.data[p] = col[0]; img.data[p + 1] = col[1]; img.data[p + 2] = col[2]; img.data[p + 3] = 255;
    }
    octx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = !!o.smooth;
    ctx.drawImage(off, M.l, M.t, pw, ph);
    ctx.fillStyle = "#4a5060";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    const every = Math.max(1, Math.ceil((o.labelGap || 12) / rh));
    for (let r = 0; r < R; r += every) ctx.fillText(truncate(ctx, S(o.rows[r]), lw - 8), lw - 5, M.t + (r + 0.5) * rh);
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const nt = Math.min(C, Math.max(2, Math.floor(pw / 80)));
    for (let i = 0; i < nt; i++) {
      const k = nt === 1 ? 0 : Math.round((i * (C - 1)) / (nt - 1)), x = M.l + (k + 0.5) * cw;
      ctx.fillRect(x, M.t + ph, 1, 4);
      ctx.fillText(tick(N(o.cols[k]) === null ? k : o.cols[k]), clamp(x, M.l + 10, M.l + pw - 10), M.t + ph + 6);
    }
    if (o.xName) ctx.fillText(o.xName, M.l + pw / 2, M.t + ph + 17);
    const px = (k) => M.l + (k + 0.5) * cw, py = (r) => M.t + (r + 0.5) * rh;
    if (o.overlay) { ctx.save(); ctx.beginPath(); ctx.rect(M.l, M.t, pw, ph); ctx.clip(); o.overlay(ctx, px, py); ctx.restore(); }
    const wrap = h("div", { class: "chart-wrap heatmap-wrap" }, c), tip = makeTip(wrap);
    for (const m of A(o.marks)) {
      const x = px(m.c), y = py(m.r), rad = Math.max(4, Math.min(9, Math.min(rh, cw) / 2 + 2));
      ctx.lineWidth = 3; ctx.strokeStyle = "#fff"; ctx.beginPath(); ctx.arc(x, y, rad, 0, 7); ctx.stroke();
      ctx.lineWidth = 1.5; ctx.strokeStyle = m.color || "#e0262f"; ctx.beginPath(); ctx.arc(x, y, rad, 0, 7); ctx.stroke();
      const mk = h("span", { class: "finding-mark", title: m.title, "data-kind": m.kind, "data-group": m.group });
      mk.style.left = x + 4 + "px"; mk.style.top = y + 4 + "px";
      if (m.onclick) mk.addEventListener("click", m.onclick);
      wrap.append(mk);
    }
    c.addEventListener("mousemove", (e) => {
      const b = c.getBoundingClientRect(), mx = e.clientX - b.left, my = e.clientY - b.top;
      const k = Math.floor((mx - M.l) / cw), r = Math.floor((my - M.t) / rh);
      if (k < 0 || k >= C || r < 0 || r >= R) return tip.hide();
      const v = o.value(r, k);
      tip.show([S(o.rows[r]), (o.xName ? o.xName.split(" ")[0] : "step") + " " + fmt(o.cols[k], 3), v === null ? "no value" : o.tipValue ? o.tipValue(v) : fmt(v)], mx + 4, my + 4);
    });
    c.addEventListener("mouseleave", () => tip.hide());
    return wrap;
  }

  // ---- state
  let DATA = {}, RUNS = [], parseError = false, Wd = 0;
  const state = { run: 0, view: "overview", layer: {}, module: {}, camStep: {}, logy: false, rot: {} };
  const run = () => O(RUNS[state.run]);
  const runName = (r) => S(O(r).name) || S(O(r).id) || "(unnamed run)";

  function width() {
    const m = document.getElementById("main"), cw = m ? m.clientWidth - 40 : 0;
    return clamp(cw > 100 ? cw : (window.innerWidth || 1240) - 40, 480, 1560);
  }
  const chartW = () => (Wd >= 900 ? Math.floor((Wd - 14) / 2) - 10 : Wd - 10);

  // ---- header
  function renderHeader() {
    const r = run(), hl = S(r.health);
    document.getElementById("run-name").textContent = RUNS.length ? runName(r) : "(no run)";
    const badge = document.getElementById("health-badge"), known = ["ok", "warning", "critical"].includes(hl);
    badge.className = "badge health-" + (known ? hl : "unknown");
    badge.textContent = known ? hl : "unknown";
    badge.setAttribute("title", "diagnosis: " + (known ? hl : "not available"));
    const meta = [S(r.experiment) && "experiment " + S(r.experiment), S(r.status), N(r.duration_s) !== null && dur(r.duration_s)].filter(Boolean);
    document.getElementById("run-meta").textContent = meta.join(" · ");
    const picker = document.getElementById("run-picker");
    picker.replaceChildren();
    if (RUNS.length > 1) {
      const sel = h("select", { id: "run-select", title: "run shown in the single-run views" });
      RUNS.forEach((x, i) => sel.append(h("option", { value: i, text: runName(x) + (S(O(x).id) ? " (" + S(O(x).id).slice(0, 8) + ")" : "") })));
      sel.value = String(state.run);
      sel.addEventListener("change", () => { state.run = +sel.value || 0; renderAll(); });
      picker.append(sel);
    }
    const foot = document.getElementById("footer");
    foot.textContent = "trainwatch " + (S(DATA.version) || "") + (S(DATA.generated) ? " · generated " + S(DATA.generated) : "");
  }

  // ---- 1. overview
  function table(cols, rows, id, numCols) {
    const nc = new Set(numCols || []);
    const t = h("table", { class: "tbl", id });
    t.append(h("thead", null, h("tr", null, cols.map((c, i) => h("th", { class: nc.has(i) ? "num" : null, text: c })))));
    const tb = h("tbody");
    for (const r of rows) tb.append(r instanceof Node ? r : h("tr", null, r.map((c, i) => h("td", { class: nc.has(i) ? "num" : null }, c))));
    t.append(tb);
    return t;
  }
  function kvTable(obj, id) {
    const keys = Object.keys(O(obj)).sort();
    if (!keys.length) return h("div", { id }, noData());
    return h("div", { class: "scroll" }, table(["key", "value"], keys.map((k) => [k, S(obj[k])]), id));
  }
  function card(title, body) { return h("div", { class: "card" }, [h("h3", { text: title }), body]); }

  function viewOverview(sec, r) {
    sec.append(h("h2", { text: "Overview" }));
    if (parseError) sec.append(h("p", { class: "banner", text: "The embedded payload could not be read; nothing to show." }));
    if (!RUNS.length) { sec.append(noData("no run in the payload")); return; }
    const info = [["name", runName(r)], ["id", S(r.id) || "–"], ["experiment", S(r.experiment) || "–"], ["status", S(r.status) || "–"],
      ["start", S(r.start) || "–"], ["end", S(r.end) || "–"], ["duration", dur(r.duration_s)]];
    const tm = O(r.timing), metric = (label, v, unit) => h("div", { class: "metric" }, [h("b", { text: fmt(v) }), h("span", { class: "muted", text: label + (unit ? " (" + unit + ")" : "") })]);
    const timing = N(tm.step_ms) === null && N(tm.samples_per_s) === null && N(tm.peak_memory_mb) === null
      ? h("div", { id: "timing" }, noData())
      : h("div", { class: "metrics", id: "timing" }, [metric("step time", tm.step_ms, "ms"), metric("throughput", tm.samples_per_s, "samples/s"), metric("peak memory", tm.peak_memory_mb, "MB")]);
    sec.append(h("div", { class: "cols" }, [card("Run", table(["", ""], info, "run-summary")), card("Timing", timing)]));

    const hl = S(r.health), fs = A(r.findings).filter(isObj).slice();
    fs.sort((a, b) => sevRank(a.severity) - sevRank(b.severity) || (N(a.first_step) ?? 0) - (N(b.first_step) ?? 0));
    const ftitle = "Findings" + (fs.length ? " (" + fs.length + ")" : "");
    if (!fs.length) sec.append(card(ftitle, h("div", { id: "findings-table" }, noData(hl === "ok" ? "no findings: training looks healthy" : "no findings"))));
    else {
      const rows = fs.map((f) => {
        const sev = S(f.severity), ev = O(f.evidence);
        const tr = h("tr", { class: "finding", "data-kind": S(f.kind), "data-severity": sev }, [
          h("td", { text: S(f.kind) }), h("td", { class: "sev" + (sevRank(sev) < 3 ? " sev-" + sev : ""), text: sev }), h("td", { text: S(f.group) || "–" }),
          h("td", { class: "num", text: fmt(f.first_step) }), h("td", { class: "num", text: fmt(f.last_step) }), h("td", { text: S(f.advice) }),
          h("td", null, h("ul", { class: "kv" }, Object.keys(ev).map((k) => h("li", { text: k + "=" + evidenceText(ev[k]) })))),
        ]);
        return tr;
      });
      sec.append(card(ftitle, h("div", { class: "scroll" }, table(["kind", "severity", "group", "first step", "last step", "advice", "evidence"], rows, "findings-table", [3, 4]))));
    }
    sec.append(h("div", { class: "cols" }, [card("Params", kvTable(r.params, "params-table")), card("Tags", kvTable(r.tags, "tags-table"))]));

    const arch = A(r.architecture).filter(isObj), LIMIT = 3000;
    let body;
    if (!arch.length) body = h("div", { id: "arch-table" }, noData());
    else {
      const rows = arch.slice(0, LIMIT).map((m) => {
        const name = h("td", { text: S(m.name) || "(model)" });
        name.style.paddingLeft = 8 + 14 * clamp(N(m.depth) || 0, 0, 30) + "px";
        const shape = Array.isArray(m.out_shape) ? "[" + m.out_shape.map((v) => S(v)).join(", ") + "]" : "–";
        return h("tr", { class: "module" }, [name, h("td", { text: S(m.type) }), h("td", { class: "num", text: fmt(m.params) }), h("td", { class: "num", text: fmt(m.trainable) }), h("td", { text: shape })]);
      });
      body = h("div", { class: "scroll" }, table(["module", "type", "params", "trainable (own)", "out shape"], rows, "arch-table", [2, 3]));
      if (arch.length > LIMIT) body.append(noData("first " + LIMIT + " of " + arch.length + " modules shown"));
    }
    sec.append(card("Architecture", body));
  }

  // ---- 2. dynamics
  const GROUPS = ["Losses", "Metrics", "Learning rate", "Throughput", "System"];
  function seriesGroup(k) {
    const l = k.toLowerCase();
    if (l.startsWith("system/")) return "System";
    if (/(^|[/_])lr([/_]|$)|learning_rate/.test(l)) return "Learning rate";
    if (/step_ms|samples_per_s|throughput|per_s$|_ms$|memory/.test(l)) return "Throughput";
    if (l.includes("loss")) return "Losses";
    return "Metrics";
  }
  const seriesKeys = (r) => Object.keys(O(r.series)).filter((k) => A(O(r.series[k]).step).length).sort();

  function viewDynamics(sec, r) {
    sec.append(h("h2", { text: "Training dynamics" }));
    const ser = O(r.series), keys = seriesKeys(r);
    if (!keys.length) { sec.append(noData("no metric series")); return; }
    const cw = chartW();
    for (const g of GROUPS) {
      const ks = keys.filter((k) => seriesGroup(k) === g);
      if (!ks.length) continue;
      const box = h("div", { class: "charts" });
      const fill = () => box.replaceChildren(...ks.map((k) => h("div", { class: "series-chart", "data-key": k },
        lineChart({ w: cw, title: k, logY: g === "Losses" && state.logy, series: [{ name: k, x: O(ser[k]).step, y: O(ser[k]).value }] }))));
      const head = h("div", { class: "toolbar" }, h("h3", { text: g }));
      if (g === "Losses") {
        const cb = h("input", { type: "checkbox", id: "logy-toggle" });
        cb.checked = state.logy;
        cb.addEventListener("change", () => { state.logy = cb.checked; fill(); });
        head.append(h("label", null, [cb, " log y"]));
      }
      fill();
      sec.append(h("div", { class: "dyn-group", "data-group": g }, [head, box]));
    }
  }

  // ---- 3. gradient flow
  function gradData(r) {
    const gf = O(r.grad_flow), groups = A(r.groups).map(S), steps = A(gf.steps);
    const lg = (M) => groups.map((_, i) => steps.map((_, k) => { const v = N(A(A(M)[i])[k]); return v === null ? null : log10(v); }));
    const g = lg(gf.grad_norm);
    const range = (M) => { let lo = Infinity, hi = -Infinity; for (const row of M) for (const v of row) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); } return lo <= hi ? [lo, hi] : null; };
    return { gf, groups, steps, g, gr: range(g) };
  }
  function gradHeat(r, d, w, range, onMark) {
    const marks = [];
    for (const f of A(r.findings).filter(isObj)) {
      const row = d.groups.indexOf(S(f.group)), fs = N(f.first_step);
      if (row < 0 || fs === null || !d.steps.length) continue;
      let col = d.steps.findIndex((s) => N(s) !== null && s >= fs);
      if (col < 0) col = d.steps.length - 1;
      const sev = S(f.severity);
      marks.push({ r: row, c: col, kind: S(f.kind), group: S(f.group), title: S(f.kind) + " (" + sev + ", " + S(f.group) + ", step " + fmt(fs) + ")",
        color: sev === "critical" ? "#e0262f" : sev === "warning" ? "#ff9f1c" : "#333", onclick: onMark ? () => onMark(S(f.group)) : null });
    }
    return heatmap({ w, rows: d.groups, cols: d.steps, value: (i, k) => d.g[i][k], lo: range[0], hi: range[1], lut: VIRIDIS, marks, cls: "grad-heatmap",
      tipValue: (v) => "grad norm " + fmt(Math.pow(10, v), 3) + " (log10 " + v.toFixed(2) + ")" });
  }

  function viewGradients(sec, r) {
    sec.append(h("h2", { text: "Gradient flow" }));
    const d = gradData(r);
    if (!d.groups.length || !d.steps.length || !d.gr) { sec.append(noData("no gradient-flow data")); return; }
    const key = state.run;
    const sel = h("select", { id: "layer-select" }, d.groups.map((g) => h("option", { value: g, text: g || "(root)" })));
    const firstFinding = A(r.findings).filter(isObj).map((f) => S(f.group)).find((g) => d.groups.includes(g));
    if (!d.groups.includes(state.layer[key])) state.layer[key] = firstFinding || d.groups[0];
    sel.value = state.layer[key];
    const detail = h("div", { class: "grad-detail" });
    const pick = (g) => { state.layer[key] = g; sel.value = g; fillDetail(); };
    sel.addEventListener("change", () => pick(sel.value));
    sec.append(h("p", { class: "muted", text: "log10 gradient norm per parameter group (rows, input side at the top) over steps; circles mark diagnosis findings (hover for the kind, click to select the group)." }));
    sec.append(gradHeat(r, d, Wd, d.gr, pick));
    sec.append(colorBar(VIRIDIS, d.gr[0], d.gr[1], "gradient norm (log colour scale)", (v) => fmt(Math.pow(10, v), 2)));
    sec.append(h("div", { class: "toolbar" }, [h("label", { for: "layer-select", text: "group" }), sel]));
    sec.append(detail);
    function fillDetail() {
      const i = Math.max(0, d.groups.indexOf(state.layer[key])), g = d.groups[i], cw = chartW();
      const fs = A(r.findings).filter((f) => isObj(f) && S(f.group) === g);
      detail.replaceChildren(...[
        h("h3", { class: "grad-detail-title", text: "group " + (g || "(root)") }),
        fs.length ? h("ul", { class: "kv" }, fs.map((f) => h("li", { text: S(f.severity) + ": " + S(f.kind) + " from step " + fmt(f.first_step) + " to " + fmt(f.last_step) }))) : null,
        h("div", { class: "charts" }, [
          lineChart({ w: cw, title: "gradient norm", logY: true, series: [{ name: g, x: d.steps, y: A(A(d.gf.grad_norm)[i]) }] }),
          lineChart({ w: cw, title: "update ratio |Δw|/|w| (band 1e-4…1e-2)", logY: true, band: [1e-4, 1e-2], guides: [1e-3], series: [{ name: g, x: d.steps, y: A(A(d.gf.update_ratio)[i]), color: PAL[1] }] }),
        ]),
      ].filter(Boolean));
    }
    fillDetail();
  }

  // ---- 4. activations
  const histCache = new WeakMap();
  function decodeHist(act) {
    if (histCache.has(act)) return histCache.get(act);
    let out = null;
    const sh = A(act.shape).map(N);
    if (sh.length === 3 && sh.every((v) => v !== null && v > 0) && typeof act.hist_b64 === "string") {
      try {
        const bin = atob(act.hist_b64), n = sh[0] * sh[1] * sh[2];
        if (bin.length >= n) {
          const bytes = new Uint8Array(n);
          for (let i = 0; i < n; i++) bytes[i] = bin.charCodeAt(i);
          out = { S: sh[0], M: sh[1], B: sh[2], bytes };
        }
      } catch (e) { out = null; }
    }
    histCache.set(act, out);
    return out;
  }

  function viewActivations(sec, r) {
    sec.append(h("h2", { text: "Activations" }));
    const act = O(r.activations), mods = A(act.modules).map(S), steps = A(act.steps), bins = A(act.bins).map(S);
    if (!mods.length) { sec.append(noData("no activation data")); return; }
    const key = state.run;
    if (!mods.includes(state.module[key])) state.module[key] = mods[0];
    const sel = h("select", { id: "act-module-select" }, mods.map((m) => h("option", { value: m, text: m })));
    sel.value = state.module[key];
    const body = h("div", { class: "act-detail" });
    sel.addEventListener("change", () => { state.module[key] = sel.value; fill(); });
    sec.append(h("div", { class: "toolbar" }, [h("label", { for: "act-module-select", text: "module" }), sel]));
    sec.append(body);
    const hist = decodeHist(act);
    function fill() {
      const m = Math.max(0, mods.indexOf(state.module[key])), kids = [h("h3", { text: "histogram of " + (mods[m] || "(root)") })];
      if (hist && m < hist.M) {
        // display order, top to bottom: nan, +inf, finite bins from the largest positive down, -inf
        let order = [...Array(hist.B).keys()];
        const tail = bins.slice(-3);
        if (hist.B > 3 && tail[0] === "nan" && tail[1] === "+inf" && tail[2] === "-inf") order = [hist.B - 1].concat(order.slice(0, hist.B - 3), [hist.B - 2, hist.B - 3]);
        order.reverse();
        const cols = steps.length === hist.S ? steps : [...Array(hist.S).keys()];
        kids.push(h("p", { class: "muted", text: "colour: log(1 + count), scaled to the largest count; rows: signed log-magnitude bins (positive at the top)." }));
        kids.push(heatmap({ w: Wd, rows: order.map((b) => bins[b] || "bin " + b), cols, rowH: 4, labelW: 130, lut: INFERNO, lo: 0, hi: 255, cls: "act-heatmap",
          value: (i, k) => hist.bytes[(k * hist.M + m) * hist.B + order[i]], tipValue: (v) => "level " + v + "/255" }));
        kids.push(colorBar(INFERNO, 0, 255, "log(1+count) / log(1+max count)", (v) => (v ? "max" : "0")));
      } else kids.push(noData("no histogram for this module"));
      const line = (name, M, color) => ({ name, x: steps, y: A(A(M)[m]), color });
      const fr = [line("zero_frac", act.zero_frac, PAL[0]), line("dead_frac", act.dead_frac, PAL[3]), line("saturated_frac", act.saturated_frac, PAL[1])];
      kids.push(h("div", { class: "charts" }, lineChart({ w: Wd - 10, h: 220, title: "fractions of zero, dead and saturated activations", series: fr })));
      body.replaceChildren(...kids);
    }
    fill();
  }

  // ---- 5. where it looks (CAM)
  const IMG_RE = /^data:image\/(png|jpeg|jpg|gif|webp|bmp);base64,[A-Za-z0-9+/=\s]*$/;
  function img(src, kind, alt) {
    if (typeof src === "string" && IMG_RE.test(src)) return h("img", { src, alt, "data-kind": kind, loading: "eager" });
    return h("div", { class: "noimg", text: "no image" });
  }
  function viewCam(sec, r) {
    sec.append(h("h2", { text: "Where it looks" }));
    const cam = O(r.cam), snaps = O(cam.snapshots), probes = O(cam.probes), targets = A(probes.targets), inputs = A(probes.images);
    const methods = (A(cam.methods).length ? A(cam.methods).map(S) : Object.keys(snaps)).filter((m) => A(snaps[m]).some(isObj));
    const list = (m) => A(snaps[m]).filter((s) => isObj(s) && N(s.step) !== null).sort((a, b) => a.step - b.step);
    const steps = [...new Set(methods.flatMap((m) => list(m).map((s) => s.step)))].sort((a, b) => a - b);
    if (!methods.length || !steps.length) { sec.append(noData("no CAM snapshots")); return; }
    const key = state.run;
    let idx = steps.indexOf(state.camStep[key]);
    if (idx < 0) idx = steps.length - 1;
    const slider = h("input", { type: "range", id: "cam-step-slider", min: 0, max: steps.length - 1, step: 1, value: idx });
    const label = h("span", { id: "cam-step-label" });
    const grids = h("div", { class: "cam-methods", id: "cam-grids" });
    sec.append(h("div", { class: "toolbar" }, [h("label", { for: "cam-step-slider", text: "snapshot" }), slider, label]));
    sec.append(grids);
    const fill = () => {
      const i = clamp(+slider.value || 0, 0, steps.length - 1), step = steps[i];
      state.camStep[key] = step;
      label.textContent = "step " + fmt(step);
      grids.replaceChildren(...methods.map((m) => {
        const ls = list(m);
        let snap = ls[0];
        for (const s of ls) if (s.step <= step) snap = s;
        const imgs = A(snap.images), n = Math.max(inputs.length, targets.length, imgs.length);
        const rows = [];
        for (let p = 0; p < n; p++) {
          const t = N(targets[p]), pr = N(A(snap.predicted)[p]), cf = N(A(snap.confidence)[p]), rm = N(A(snap.raw_max)[p]);
          rows.push(h("tr", { class: "probe" }, [
            h("td", null, [img(inputs[p], "input", "probe " + p), h("div", { text: "probe " + p }), h("div", { text: "target " + (t === null ? "–" : t) })]),
            h("td", null, [img(imgs[p], "cam", m + " probe " + p),
              h("div", { class: pr === null || t === null ? null : pr === t ? "ok" : "bad", text: "predicted " + (pr === null ? "–" : pr) }),
              h("div", { text: "confidence " + pct(cf) }), rm === null ? null : h("div", { class: "muted", text: "raw max " + fmt(rm, 3) })]),
          ]));
        }
        const tbl = h("table", { class: "cam-grid", "data-method": m }, [h("thead", null, h("tr", null, [h("th", { text: "input" }), h("th", { text: m + " @ step " + fmt(snap.step) })])), h("tbody", null, rows)]);
        return h("div", { class: "cam-method" }, [h("h3", { text: m }), n ? tbl : noData("no probes")]);
      }));
    };
    slider.addEventListener("input", fill);
    slider.addEventListener("change", fill);
    fill();
  }

  // ---- 6. landscape
  function fidx(arr, v) {
    const n = arr.length;
    if (n < 2) return 0;
    for (let i = 0; i < n - 1; i++) {
      const a = arr[i], b = arr[i + 1];
      if ((v >= a && v <= b) || (v <= a && v >= b)) return i + (b === a ? 0 : (v - a) / (b - a));
    }
    return (v < arr[0]) === (arr[1] > arr[0]) ? (v - arr[0]) / (arr[1] - arr[0] || 1) : n - 1 + (v - arr[n - 1]) / (arr[n - 1] - arr[n - 2] || 1);
  }
  function viewLandscape(sec, r) {
    sec.append(h("h2", { text: "Loss landscape" }));
    const L = O(r.landscapes), names = Object.keys(L).filter((k) => isObj(L[k]));
    if (!names.length) { sec.append(noData("no landscape data (run `trainwatch landscape`)")); return; }
    for (const name of names) sec.append(landscapeBlock(name, L[name]));
  }
  function landscapeBlock(name, ls) {
    const box = h("div", { class: "landscape card", "data-name": name }, h("h3", { text: name }));
    const al = A(ls.alphas).map((v, i) => (N(v) === null ? i : v)), be = A(ls.betas).map((v, i) => (N(v) === null ? i : v)), loss = A(ls.loss);
    const nA = al.length, nB = be.length, z = [];
    let vmin = Infinity, vmax = -Infinity;
    for (let i = 0; i < nA; i++) { z.push([]); for (let j = 0; j < nB; j++) { const v = N(A(loss[i])[j]); z[i].push(v); if (v !== null) { vmin = Math.min(vmin, v); vmax = Math.max(vmax, v); } } }
    const cols = h("div", { class: "cols" });
    box.append(cols);
    if (nA >= 2 && nB >= 2 && vmin <= vmax) {
      const logS = vmin > 0 && vmax / vmin > 100, T = (v) => (v === null ? null : logS ? Math.log10(v) : v);
      const Z = z.map((row) => row.map(T)), zlo = T(vmin), zhi = T(vmax) === zlo ? zlo + 1 : T(vmax), sz = clamp(Math.floor(Wd / 2) - 30, 260, 480);
      const left = h("div");
      left.append(contourMap(Z, al, be, zlo, zhi, sz, ls.trajectory, logS));
      left.append(colorBar(VIRIDIS, zlo, zhi, logS ? "loss (log colour scale)" : "loss", (v) => fmt(logS ? Math.pow(10, v) : v, 3)));
      cols.append(left, h("div", null, [surface3d(name, Z, zlo, zhi, sz, al, be), h("div", { class: "muted", text: "drag to rotate" })]));
    } else cols.append(noData("no 2-D surface"));
    const curve = A(ls.curve), pos = curve.map(N).filter((v) => v !== null);
    const cmin = Math.min(...pos), cmax = Math.max(...pos);
    box.append(pos.length ? lineChart({ w: Math.min(Wd - 30, 900), title: "1-D loss along direction 1", xName: "α", logY: cmin > 0 && cmax / cmin > 100, guides: [], series: [{ name: "loss", x: al.slice(0, curve.length), y: curve }] }) : noData("no 1-D curve"));
    const meta = O(ls.meta), mk = Object.keys(meta);
    if (mk.length) box.append(h("details", null, [h("summary", { text: "meta" }), h("ul", { class: "kv" }, mk.map((k) => h("li", { text: k + "=" + evidenceText(meta[k]) })))]));
    return box;
  }
  function contourMap(Z, al, be, zlo, zhi, sz, traj, logS) {
    const nA = al.length, nB = be.length, span = zhi - zlo || 1, R = (j) => nB - 1 - j; // rows: largest β at the top
    const overlay = (ctx, px, py) => {
      const PY = (fj) => py(R(fj));
      ctx.strokeStyle = "rgba(255,255,255,0.55)";
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let k = 1; k < 12; k++) { // contour lines: marching squares between cell centres
        const lv = zlo + (span * k) / 12;
        for (let i = 0; i < nA - 1; i++) for (let j = 0; j < nB - 1; j++) {
          const q = [[i, j], [i + 1, j], [i + 1, j + 1], [i, j + 1]], v = q.map(([a, b]) => Z[a][b]), pts = [];
          if (v.includes(null)) continue;
          for (let e = 0; e < 4; e++) {
            const a = v[e], b = v[(e + 1) % 4], p0 = q[e], p1 = q[(e + 1) % 4];
            if ((a < lv) !== (b < lv)) { const t = (lv - a) / (b - a); pts.push([px(p0[0] + (p1[0] - p0[0]) * t), PY(p0[1] + (p1[1] - p0[1]) * t)]); }
          }
          for (let n = 0; n + 1 < pts.length; n += 2) { ctx.moveTo(pts[n][0], pts[n][1]); ctx.lineTo(pts[n + 1][0], pts[n + 1][1]); }
        }
      }
      ctx.stroke();
      const tr = A(traj).filter((p) => Array.isArray(p) && N(p[0]) !== null && N(p[1]) !== null).map((p) => [px(fidx(al, p[0])), PY(fidx(be, p[1]))]);
      for (const [col, wd] of tr.length ? [["#111", 4], ["#ff7f0e", 2]] : []) {
        ctx.strokeStyle = col; ctx.lineWidth = wd; ctx.beginPath();
        tr.forEach((p, i) => (i ? ctx.lineTo(p[0], p[1]) : ctx.moveTo(p[0], p[1])));
        ctx.stroke();
      }
      ctx.fillStyle = "#ff7f0e";
      for (const p of tr) { ctx.beginPath(); ctx.arc(p[0], p[1], 2.5, 0, 7); ctx.fill(); }
      const cx = px(fidx(al, 0)), cy = PY(fidx(be, 0)); // the trained weights
      ctx.beginPath(); ctx.moveTo(cx - 7, cy); ctx.lineTo(cx + 7, cy); ctx.moveTo(cx, cy - 7); ctx.lineTo(cx, cy + 7);
      ctx.lineWidth = 3; ctx.strokeStyle = "#111"; ctx.stroke();
      ctx.lineWidth = 1.5; ctx.strokeStyle = "#fff"; ctx.stroke();
    };
    const labelW = 56, rowH = (sz - labelW - 10) / nB;
    return heatmap({ w: sz, rows: be.map((_, r) => "β " + tick(be[R(r)])), cols: al, xName: "α (direction 1)", labelW, rowH, labelGap: 36, smooth: true, lut: VIRIDIS,
      lo: zlo, hi: zhi, value: (r, k) => Z[k][R(r)], overlay, cls: "landscape-map", tipValue: (v) => "loss " + fmt(logS ? Math.pow(10, v) : v, 4) });
  }
  function surface3d(name, Z, zlo, zhi, sz, al, be) {
    const { c, ctx, dpr } = makeCanvas(sz, sz, "chart landscape-3d");
    const nA = Z.length, nB = Z[0].length, stride = Math.max(1, Math.ceil(Math.max(nA, nB) / 60)), span = zhi - zlo || 1;
    const rot = state.rot[name] || (state.rot[name] = { yaw: -0.6, pitch: 0.55 });
    const ci = fidx(al, 0), cj = fidx(be, 0);
    const gx = (i) => (nA > 1 ? (i / (nA - 1)) * 2 - 1 : 0), gy = (j) => (nB > 1 ? (j / (nB - 1)) * 2 - 1 : 0), gz = (v) => ((v - zlo) / span) * 1.2 - 0.6;
    function draw() {
      ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
      ctx.clearRect(0, 0, sz, sz);
      ctx.fillStyle = "#fbfbfd"; ctx.fillRect(0, 0, sz, sz);
      const cy = Math.cos(rot.yaw), sy = Math.sin(rot.yaw), cp = Math.cos(rot.pitch), sp = Math.sin(rot.pitch), sc = sz * 0.3;
      const P = (x, y, zz) => { const x1 = x * cy - y * sy, y1 = x * sy + y * cy; return [sz / 2 + x1 * sc, sz / 2 - (zz * cp + y1 * sp) * sc]; };
      ctx.strokeStyle = "#c9ccd6"; ctx.lineWidth = 1; ctx.beginPath();
      [[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1]].forEach(([x, y], k) => { const p = P(x, y, -0.6); k ? ctx.lineTo(p[0], p[1]) : ctx.moveTo(p[0], p[1]); });
      ctx.stroke();
      ctx.fillStyle = "#6b7385"; ctx.textAlign = "center"; ctx.textBaseline = "middle";
      let p = P(0, -1.2, -0.6); ctx.fillText("α", p[0], p[1]);
      p = P(-1.2, 0, -0.6); ctx.fillText("β", p[0], p[1]);
      const seg = (a, b, va, vb) => {
        if (va === null || vb === null) return;
        ctx.strokeStyle = rgb(colorAt(VIRIDIS, ((va + vb) / 2 - zlo) / span));
        ctx.beginPath(); ctx.moveTo(a[0], a[1]); ctx.lineTo(b[0], b[1]); ctx.stroke();
      };
      const pts = [];
      for (let i = 0; i < nA; i++) { pts.push([]); for (let j = 0; j < nB; j++) pts[i].push(Z[i][j] === null ? null : P(gx(i), gy(j), gz(Z[i][j]))); }
      ctx.lineWidth = 1;
      const lines = (n, s) => { const out = []; for (let k = 0; k < n; k += s) out.push(k); if (out[out.length - 1] !== n - 1) out.push(n - 1); return out; };
      const I = lines(nA, stride), J = lines(nB, stride);
      for (const i of I) for (let k = 0; k + 1 < J.length; k++) seg(pts[i][J[k]], pts[i][J[k + 1]], Z[i][J[k]], Z[i][J[k + 1]]);
      for (const j of J) for (let k = 0; k + 1 < I.length; k++) seg(pts[I[k]][j], pts[I[k + 1]][j], Z[I[k]][j], Z[I[k + 1]][j]);
      const ni = clamp(Math.round(ci), 0, nA - 1), nj = clamp(Math.round(cj), 0, nB - 1), vz = Z[ni][nj];
      if (vz !== null) {
        const top = P(gx(ci), gy(cj), gz(vz)), bot = P(gx(ci), gy(cj), -0.6);
        ctx.strokeStyle = "#e0262f"; ctx.lineWidth = 1; ctx.setLineDash([3, 3]); ctx.beginPath(); ctx.moveTo(bot[0], bot[1]); ctx.lineTo(top[0], top[1]); ctx.stroke(); ctx.setLineDash([]);
        ctx.fillStyle = "#e0262f"; ctx.beginPath(); ctx.arc(top[0], top[1], 4, 0, 7); ctx.fill();
      }
    }
    let drag = null;
    c.addEventListener("pointerdown", (e) => { drag = [e.clientX, e.clientY]; try { c.setPointerCapture(e.pointerId); } catch (err) { /* ignore */ } });
    c.addEventListener("pointermove", (e) => {
      if (!drag) return;
      rot.yaw += (e.clientX - drag[0]) * 0.01;
      rot.pitch = clamp(rot.pitch + (e.clientY - drag[1]) * 0.01, -1.5, 1.5);
      drag = [e.clientX, e.clientY];
      draw();
    });
    const end = () => { drag = null; };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    draw();
    return h("div", { class: "chart-wrap" }, c);
  }

  // ---- 7. compare
  function viewCompare(sec) {
    const a = O(RUNS[0]), b = O(RUNS[1]);
    sec.append(h("h2", { text: "Compare: " + runName(a) + " vs " + runName(b) }));
    const da = gradData(a), db = gradData(b), rs = [da.gr, db.gr].filter(Boolean);
    const half = Math.floor((Wd - 14) / 2) - 10;
    sec.append(h("h3", { text: "Gradient flow (shared colour scale)" }));
    const range = rs.length ? [Math.min(...rs.map((x) => x[0])), Math.max(...rs.map((x) => x[1]))] : null;
    sec.append(h("div", { class: "charts compare-grad" }, [[a, da], [b, db]].map(([r, d], k) => h("div", { class: "compare-col", "data-run": k }, [
      h("h3", { text: runName(r) }),
      range && d.gr && d.groups.length && d.steps.length ? gradHeat(r, d, half, range, null) : noData("no gradient-flow data"),
    ]))));
    if (range) sec.append(colorBar(VIRIDIS, range[0], range[1], "gradient norm (log colour scale)", (v) => fmt(Math.pow(10, v), 2)));
    sec.append(h("h3", { text: "Common series" }));
    const kb = new Set(seriesKeys(b)), common = seriesKeys(a).filter((k) => kb.has(k));
    common.sort((x, y) => GROUPS.indexOf(seriesGroup(x)) - GROUPS.indexOf(seriesGroup(y)) || (x < y ? -1 : 1));
    if (!common.length) { sec.append(noData("no series in common")); return; }
    sec.append(h("div", { class: "charts" }, common.map((k) => h("div", { class: "series-chart", "data-key": k }, lineChart({
      w: chartW(), title: k, series: [a, b].map((r, i) => ({ name: runName(r), x: O(O(r.series)[k]).step, y: O(O(r.series)[k]).value, color: PAL[i] })),
    })))));
  }

  // ---- tabs, render loop
  function show(view) {
    if (!document.getElementById("view-" + view)) view = "overview";
    state.view = view;
    for (const t of document.querySelectorAll("button.tab")) {
      const on = t.dataset.view === view;
      t.classList.toggle("active", on);
      t.setAttribute("aria-selected", on ? "true" : "false");
    }
    for (const v of VIEWS) { const s = document.getElementById("view-" + v); if (s) s.hidden = v !== view; }
  }
  const RENDER = { overview: viewOverview, dynamics: viewDynamics, gradients: viewGradients, activations: viewActivations, cam: viewCam, landscape: viewLandscape };
  function renderAll() {
    Wd = width();
    try { renderHeader(); } catch (e) { console.error("trainwatch header:", e); }
    for (const v of VIEWS) {
      const sec = document.getElementById("view-" + v);
      if (!sec) continue;
      sec.replaceChildren();
      try {
        if (v === "compare") viewCompare(sec);
        else RENDER[v](sec, run());
      } catch (e) {
        sec.append(h("p", { class: "error", text: "could not render this view: " + S(e && e.message) }));
        console.error("trainwatch " + v + ":", e);
      }
    }
  }
  function init() {
    const el = document.getElementById("trainwatch-data"), txt = el ? el.textContent : "";
    try { DATA = O(JSON.parse(txt)); } catch (e) {
      try { DATA = O(JSON.parse(txt.replace(/\bNaN\b|-?\bInfinity\b/g, "null"))); } catch (e2) { DATA = {}; parseError = true; }
    }
    RUNS = A(DATA.runs).filter(isObj);
    if (RUNS.length < 2) {
      for (const n of [document.querySelector("button.tab[data-view='compare']"), document.getElementById("view-compare")]) if (n) n.remove();
    }
    for (const t of document.querySelectorAll("button.tab")) t.addEventListener("click", () => show(t.dataset.view));
    let start = "overview";
    try { const hsh = (location.hash || "").slice(1); if (VIEWS.includes(hsh)) start = hsh; } catch (e) { /* sandboxed */ }
    try { renderAll(); } finally {
      show(start);
      document.body.dataset.ready = "1";
    }
    let timer = 0;
    window.addEventListener("resize", () => {
      clearTimeout(timer);
      timer = setTimeout(() => { if (Math.abs(width() - Wd) > 30) renderAll(); }, 250);
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
