// The report's only script: sortable tables, heat colours, training curves drawn as SVG from
// the runs' log.csv data, and the synchronised zoom of the scene crops. No framework, no network.
(function () {
  "use strict";
  const SVG = "http://www.w3.org/2000/svg";
  const curves = JSON.parse(document.getElementById("curve-data").textContent);
  const PALETTE = ["#3d5a80", "#e07a5f", "#2a9d8f", "#9c6ade", "#d4a017", "#5c946e", "#c2185b", "#607d8b"];

  // --- sortable tables: click a header; empty cells always sort last ---------------------
  function cellValue(row, index, type) {
    const cell = row.cells[index];
    const raw = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent.trim();
    if (raw === "") return null;
    return type === "num" ? parseFloat(raw) : raw.toLowerCase();
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    const headers = Array.from(table.tHead.rows[0].cells);
    headers.forEach(function (th, index) {
      const type = th.dataset.type;
      if (!type) return;
      th.addEventListener("click", function () {
        const desc = !th.classList.contains("sorted-desc") && (type === "num" || th.classList.contains("sorted-asc"));
        headers.forEach(h => h.classList.remove("sorted-asc", "sorted-desc"));
        th.classList.add(desc ? "sorted-desc" : "sorted-asc");
        const body = table.tBodies[0];
        const rows = Array.from(body.rows);
        rows.sort(function (a, b) {
          const va = cellValue(a, index, type), vb = cellValue(b, index, type);
          if (va === null || vb === null) return (va === null) - (vb === null);
          const order = va < vb ? -1 : va > vb ? 1 : 0;
          return desc ? -order : order;
        });
        rows.forEach(r => body.appendChild(r));
      });
    });
  });

  // --- the best value of each figure column is marked (higher is better in all of them) -------
  document.querySelectorAll("table.sortable").forEach(function (table) {
    Array.from(table.tHead.rows[0].cells).forEach(function (th, index) {
      if (!th.classList.contains("heat")) return;
      const cells = Array.from(table.tBodies[0].rows).map(r => r.cells[index]);
      const values = cells.map(c => parseFloat(c.getAttribute("data-v")));
      const finite = values.filter(v => !isNaN(v));
      if (finite.length < 2) return;
      const best = Math.max.apply(null, finite);
      cells.forEach((c, i) => { if (values[i] === best) c.classList.add("best"); });
    });
  });

  // --- line charts ---------------------------------------------------------------------------
  function niceTicks(lo, hi, count, integer) {
    const span = hi - lo || Math.abs(hi) || 1;
    const step0 = span / count, mag = Math.pow(10, Math.floor(Math.log10(step0)));
    // whole-number axes (steps) take whole-number ticks: no 2.5 multiples, no step below 1
    const multiples = integer ? [1, 2, 5, 10] : [1, 2, 2.5, 5, 10];
    let step = multiples.map(m => m * mag).find(s => span / s <= count) || 10 * mag;
    if (integer) step = Math.max(1, Math.round(step));
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
    return {ticks: ticks, step: step};
  }
  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(k => node.setAttribute(k, attrs[k]));
    if (parent) parent.appendChild(node);
    return node;
  }
  // series: [{label, color, dash, width, points: [[x, y]...]}]; refs: [{y, color, label}]
  function drawChart(container, series, refs, legend) {
    container.textContent = "";
    const all = series.flatMap(s => s.points);
    if (!all.length) {
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = "No validation points yet.";
      container.appendChild(p);
      return;
    }
    const W = 1000, H = 300, m = {l: 58, r: 16, t: 10, b: 36};
    const xs = all.map(p => p[0]), ys = all.map(p => p[1]).concat(refs.map(r => r.y));
    let x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    if (x1 === x0) x1 = x0 + 1;
    let y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    const pad = (y1 - y0 || 0.01) * 0.08;
    y0 -= pad; y1 += pad;
    const X = x => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
    const Y = y => H - m.b - (y - y0) / (y1 - y0) * (H - m.t - m.b);
    if (legend.length) {
      const box = document.createElement("div");
      box.className = "legend";
      legend.forEach(function (item) {
        const span = document.createElement("span");
        span.style.setProperty("--c", item.color);
        span.textContent = item.label;
        box.appendChild(span);
      });
      container.appendChild(box);
    }
    const svg = el("svg", {viewBox: "0 0 " + W + " " + H, role: "img"}, container);
    const grid = el("g", {"font-size": 12, fill: "#6b7280"}, svg);
    const yt = niceTicks(y0, y1, 6), xt = niceTicks(x0, x1, 8, true);
    const ydigits = (String(+yt.step.toPrecision(6)).split(".")[1] || "").length;  // as many as the step has
    yt.ticks.forEach(function (t) {
      el("line", {x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t), stroke: "#eceef2"}, grid);
      el("text", {x: m.l - 6, y: Y(t) + 4, "text-anchor": "end"}, grid).textContent = t.toFixed(ydigits);
    });
    xt.ticks.forEach(function (t) {
      el("text", {x: X(t), y: H - m.b + 16, "text-anchor": "middle"}, grid).textContent = String(t);
    });
    el("line", {x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, stroke: "#9ca3af"}, grid);
    el("text", {x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle"}, grid).textContent = "step";
    el("text", {x: 14, y: (m.t + H - m.b) / 2, "text-anchor": "middle",
                transform: "rotate(-90 14 " + (m.t + H - m.b) / 2 + ")"}, grid).textContent = "validation SSIM";
    refs.forEach(function (r) {
      const line = el("line", {x1: m.l, x2: W - m.r, y1: Y(r.y), y2: Y(r.y), stroke: r.color,
                               "stroke-dasharray": "5 4", "stroke-width": 1, opacity: 0.55}, svg);
      el("title", {}, line).textContent = r.label + ": " + r.y.toFixed(4);
    });
    series.forEach(function (s) {
      const d = s.points.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join("");
      const g = el("g", {class: "series"}, svg);
      el("path", {d: d, fill: "none", stroke: s.color, "stroke-width": s.width || 1.8,
                  "stroke-dasharray": s.dash || "none", "stroke-linejoin": "round"}, g);
      s.points.forEach(function (p) {
        const dot = el("circle", {cx: X(p[0]), cy: Y(p[1]), r: 2.6, fill: s.color}, g);
        el("title", {}, dot).textContent = s.label + " · step " + p[0] + " · " + p[1].toFixed(4);
      });
    });
  }
  function runSeries(name, runs, color, dash) {
    return runs.map(r => ({label: name + " " + r.label, color: color, dash: dash, points: r.points}));
  }
  // one experiment: a colour per fold (seeds share it, dashed beyond the first)
  document.querySelectorAll(".chart[data-curves]").forEach(function (box) {
    const runs = curves[box.dataset.curves] || [];
    const folds = Array.from(new Set(runs.map(r => r.fold))).sort((a, b) => a - b);
    const seeds = Array.from(new Set(runs.map(r => r.seed))).sort((a, b) => a - b);
    const color = f => PALETTE[folds.indexOf(f) % PALETTE.length];
    const series = runs.map(r => ({label: r.label, color: color(r.fold), dash: seeds.indexOf(r.seed) ? "6 3" : "none",
                                   points: r.points}));
    const refs = [];
    folds.forEach(function (f) {
      const r = runs.find(x => x.fold === f && x.bicubic !== null);
      if (r) refs.push({y: r.bicubic, color: color(f), label: "bicubic fold " + f});
    });
    const legend = folds.map(f => ({label: "fold " + f, color: color(f)}));
    if (seeds.length > 1) legend.push({label: "seeds " + seeds.join(", ") + " (dashed after the first)", color: "#9ca3af"});
    drawChart(box, series, refs, legend);
  });

  // --- comparison: the ticked experiments (two at most) on one plot --------------------------
  const compareBox = document.getElementById("compare-chart");
  const boxes = Array.from(document.querySelectorAll("input.compare"));
  let ticked = [];
  function drawCompare() {
    boxes.forEach(function (b) {
      b.checked = ticked.indexOf(b.value) >= 0;
      b.closest("tr").classList.toggle("selected", b.checked);
    });
    const hint = document.getElementById("compare-hint");
    if (!ticked.length) {
      compareBox.textContent = "";
      const p = document.createElement("p");
      p.className = "empty";
      p.textContent = boxes.some(b => !b.disabled) ? "Tick one or two experiments in the table." : "No training run yet.";
      compareBox.appendChild(p);
      hint.textContent = "";
      return;
    }
    hint.textContent = ticked.length === 2 ? "Comparing " + ticked.join(" and ") + " (every fold and seed)." :
      "Tick a second experiment to overlay it.";
    const colors = ["#3d5a80", "#e07a5f"];
    let series = [], refs = [];
    ticked.forEach(function (name, i) {
      series = series.concat(runSeries(name, curves[name] || [], colors[i], i ? "7 3" : "none"));
      const bic = (curves[name] || []).map(r => r.bicubic).filter(v => v !== null);
      if (bic.length) refs.push({y: bic.reduce((a, b) => a + b, 0) / bic.length, color: "#9ca3af",
                                 label: name + " bicubic (mean over folds)"});
    });
    drawChart(compareBox, series, refs.slice(0, 1), ticked.map((n, i) => ({label: n, color: colors[i]})));
    compareBox.dataset.experiments = ticked.join(",");
  }
  boxes.forEach(function (b) {
    b.addEventListener("change", function () {
      ticked = ticked.filter(n => n !== b.value);
      if (b.checked) ticked.push(b.value);
      if (ticked.length > 2) ticked.shift();   // two at most: the oldest tick goes
      drawCompare();
    });
  });
  ticked = boxes.filter(b => !b.disabled).slice(0, 2).map(b => b.value);  // the table's first two (best CV)
  drawCompare();

  // --- synchronised zoom ---------------------------------------------------------------------
  document.querySelectorAll(".zoom-group").forEach(function (group) {
    const ports = Array.from(group.querySelectorAll(".viewport"));
    const info = group.parentElement.querySelector(".zoom-info");
    const state = {z: 1, cx: 0.5, cy: 0.5};
    const MAX = 16;
    function apply() {
      const z = state.z, half = 0.5 / z;
      state.cx = Math.min(Math.max(state.cx, half), 1 - half);
      state.cy = Math.min(Math.max(state.cy, half), 1 - half);
      ports.forEach(function (port) {
        const w = port.clientWidth, h = port.clientHeight;
        const tx = w / 2 - state.cx * w * z, ty = h / 2 - state.cy * h * z;
        port.firstElementChild.style.transform = "translate(" + tx.toFixed(2) + "px," + ty.toFixed(2) + "px) scale(" + z + ")";
        port.classList.toggle("zoomed", z > 1);
      });
      const img = ports[ports.length - 1].firstElementChild;
      const n = img.naturalWidth || 0;
      if (info) info.textContent = z > 1 && n ? "zoom ×" + z.toFixed(1) + " · x " + Math.round((state.cx - half) * n) + "–" +
        Math.round((state.cx + half) * n) + ", y " + Math.round((state.cy - half) * n) + "–" + Math.round((state.cy + half) * n) + " px" : "";
    }
    function where(port, event) {   // the event's position as a fraction of the (zoomed) image
      const r = port.getBoundingClientRect(), half = 0.5 / state.z;
      return [state.cx - half + (event.clientX - r.left) / r.width / state.z,
              state.cy - half + (event.clientY - r.top) / r.height / state.z];
    }
    let drag = null;
    ports.forEach(function (port) {
      port.addEventListener("pointerdown", function (e) {
        drag = {port: port, x: e.clientX, y: e.clientY, cx: state.cx, cy: state.cy, moved: false};
        port.setPointerCapture(e.pointerId);
      });
      port.addEventListener("pointermove", function (e) {
        if (!drag || drag.port !== port) return;
        const r = port.getBoundingClientRect();
        const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
        if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
        if (!drag.moved || state.z === 1) return;
        port.classList.add("dragging");
        state.cx = drag.cx - dx / r.width / state.z;
        state.cy = drag.cy - dy / r.height / state.z;
        apply();
      });
      port.addEventListener("pointerup", function (e) {
        port.classList.remove("dragging");
        if (drag && !drag.moved) {      // a click: zoom in (x4 the first time) centred there
          const p = where(port, e);
          state.cx = p[0]; state.cy = p[1];
          state.z = state.z === 1 ? 4 : Math.min(state.z * 2, MAX);
          apply();
        }
        drag = null;
      });
      port.addEventListener("wheel", function (e) {
        e.preventDefault();
        const p = where(port, e);
        const z = Math.min(Math.max(state.z * (e.deltaY < 0 ? 1.25 : 0.8), 1), MAX);
        // keep the pixel under the pointer where it is
        const r = port.getBoundingClientRect();
        const fx = (e.clientX - r.left) / r.width, fy = (e.clientY - r.top) / r.height;
        state.z = z;
        state.cx = p[0] + (0.5 - fx) / z;
        state.cy = p[1] + (0.5 - fy) / z;
        apply();
      }, {passive: false});
      port.addEventListener("dblclick", function () { state.z = 1; state.cx = 0.5; state.cy = 0.5; apply(); });
    });
    window.addEventListener("resize", apply);
    group._zoom = {state: state, apply: apply};
    apply();
  });
})();
