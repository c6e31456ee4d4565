// The embedding map: GET /api/map?color=COLUMN -> points drawn on a plain canvas (no plotting library).
// Drag to pan, wheel to zoom, click a point to search from that cell (searchCellId in app.js); the last
// search's query and neighbours are ringed. Loaded when the panel is first opened.
"use strict";

(() => {
  const panel = $("map-panel"), canvas = $("map"), colorSelect = $("map-color"), note = $("map-note");
  const PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    "#e377c2", "#17becf", "#bcbd22", "#393b79", "#ad494a", "#637939",
  ];
  const UNKNOWN_COLOR = "#b8bcc6", OTHER_COLOR = "#7f7f7f";
  const NAMES = { cell_type: "cell type", patient_id: "patient", is_blast: "blast", prediction: "probe prediction" };
  const RADIUS = 3.5, PICK_PX = 8;
  let points = [], colors = new Map(), view = null, loaded = false, highlight = null, pollTimer = null;

  function size() {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth, height = canvas.clientHeight;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    return { width, height, ratio };
  }

  // view: screen = (world - centre) * scale + half the canvas
  function fitView() {
    if (!points.length) return;
    const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
    const minX = Math.min(...xs), maxX = Math.max(...xs), minY = Math.min(...ys), maxY = Math.max(...ys);
    const { width, height } = size();
    const scale = 0.9 * Math.min(width / Math.max(maxX - minX, 1e-6), height / Math.max(maxY - minY, 1e-6));
    view = { cx: (minX + maxX) / 2, cy: (minY + maxY) / 2, scale };
  }

  function toScreen(p) {
    const { width, height } = size();
    return { x: (p.x - view.cx) * view.scale + width / 2, y: height / 2 - (p.y - view.cy) * view.scale };
  }

  function draw() {
    const { width, height, ratio } = size();
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, width, height);
    if (!view) return;
    ctx.globalAlpha = highlight ? 0.35 : 0.85;
    for (const p of points) {
      const s = toScreen(p);
      if (s.x < -RADIUS || s.y < -RADIUS || s.x > width + RADIUS || s.y > height + RADIUS) continue;
      ctx.fillStyle = colors.get(p.value) || OTHER_COLOR;
      ctx.beginPath();
      ctx.arc(s.x, s.y, RADIUS, 0, 2 * Math.PI);
      ctx.fill();
    }
    ctx.globalAlpha = 1;
    if (!highlight) return;
    for (const p of points) {
      const isQuery = p.cell_id === highlight.query;
      if (!isQuery && !highlight.neighbours.has(p.cell_id)) continue;
      const s = toScreen(p);
      ctx.fillStyle = colors.get(p.value) || OTHER_COLOR;
      ctx.strokeStyle = isQuery ? "#000" : "#7a2e8e";
      ctx.lineWidth = isQuery ? 2.5 : 1.5;
      ctx.beginPath();
      ctx.arc(s.x, s.y, isQuery ? RADIUS + 3 : RADIUS + 1.5, 0, 2 * Math.PI);
      ctx.fill();
      ctx.stroke();
    }
  }

  function nearest(clientX, clientY) {
    const box = canvas.getBoundingClientRect();
    const x = clientX - box.left, y = clientY - box.top;
    let best = null, bestD = PICK_PX * PICK_PX;
    for (const p of points) {
      const s = toScreen(p), d = (s.x - x) ** 2 + (s.y - y) ** 2;
      if (d <= bestD) [best, bestD] = [p, d];
    }
    return best;
  }

  function legend(values) {
    colors = new Map();
    const list = $("legend");
    list.replaceChildren();
    values.forEach((value, i) => {
      const color = value === "unknown" ? UNKNOWN_COLOR : i < PALETTE.length ? PALETTE[i] : OTHER_COLOR;
      colors.set(value, color);
      if (i > PALETTE.length) return;
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = i === PALETTE.length && value !== "unknown" ? OTHER_COLOR : color;
      const count = points.filter((p) => p.value === value).length;
      item.append(swatch, document.createTextNode(i === PALETTE.length ? `${values.length - i} more` : value));
      if (i < PALETTE.length) item.title = `${value}: ${count} cells`;
      list.append(item);
    });
  }

  async function load() {
    clearTimeout(pollTimer);
    const color = colorSelect.value || "cell_type";
    note.textContent = "loading the map…";
    let answer;
    try {
      const response = await fetch(`/api/map?color=${encodeURIComponent(color)}`);
      answer = await response.json();
      if (!response.ok) throw new Error(answer.detail || response.statusText);
    } catch (err) {
      note.textContent = `the map cannot be loaded: ${err.message}`;
      return;
    }
    if (!colorSelect.options.length) {
      for (const column of answer.colors) colorSelect.append(new Option(NAMES[column] || column, column));
      colorSelect.value = answer.color;
    }
    if (answer.status === "computing") {
      note.textContent = answer.message;
      pollTimer = setTimeout(load, 2000);
      return;
    }
    if (answer.status === "missing") {
      note.textContent = answer.message;
      return;
    }
    const first = !points.length;
    points = answer.points;
    legend(answer.values);
    if (first) fitView();
    canvas.dataset.points = String(points.length);
    const shown = points.length < answer.n_indexed ? `${points.length} of ${answer.n_indexed}` : `${points.length}`;
    note.textContent = `${shown} cells, coloured by ${NAMES[answer.color] || answer.color}`;
    draw();
  }

  let drag = null;
  canvas.addEventListener("pointerdown", (e) => {
    drag = { x: e.clientX, y: e.clientY, moved: false };
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!view) return;
    if (!drag) {
      const p = nearest(e.clientX, e.clientY);
      canvas.title = p ? `${p.value} · cell ${p.cell_id.slice(0, 12)} (click to search)` : "";
      canvas.style.cursor = p ? "pointer" : "grab";
      return;
    }
    const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
    if (!drag.moved && dx * dx + dy * dy < 9) return;
    drag.moved = true;
    view.cx -= dx / view.scale;
    view.cy += dy / view.scale;
    drag.x = e.clientX;
    drag.y = e.clientY;
    draw();
  });
  canvas.addEventListener("pointerup", (e) => {
    const wasDrag = drag && drag.moved;
    drag = null;
    if (wasDrag || !view) return;
    const p = nearest(e.clientX, e.clientY);
    if (p) {
      searchCellId(p.cell_id);
      $("result").scrollIntoView({ behavior: "smooth", block: "start" });
    }
  });
  canvas.addEventListener(
    "wheel",
    (e) => {
      if (!view) return;
      e.preventDefault();
      const box = canvas.getBoundingClientRect(), { width, height } = size();
      const x = e.clientX - box.left - width / 2, y = height / 2 - (e.clientY - box.top);
      const factor = Math.exp(-e.deltaY * 0.0015);
      // keep the world point under the cursor where it is
      view.cx += x / view.scale - x / (view.scale * factor);
      view.cy += y / view.scale - y / (view.scale * factor);
      view.scale *= factor;
      draw();
    },
    { passive: false },
  );
  $("map-reset").addEventListener("click", () => {
    fitView();
    draw();
  });
  colorSelect.addEventListener("change", load);
  panel.addEventListener("toggle", () => {
    if (panel.open && !loaded) {
      loaded = true;
      load();
    } else if (panel.open) draw();
  });
  window.addEventListener("resize", () => view && draw());
  document.addEventListener("marrowlens:result", (e) => {
    const result = e.detail;
    highlight = result && result.query.cell
      ? { query: result.query.cell.cell_id, neighbours: new Set(result.neighbours.map((n) => n.cell_id)) }
      : result ? { query: null, neighbours: new Set(result.neighbours.map((n) => n.cell_id)) } : null;
    draw();
  });

  // For tests and the curious: where a cell is drawn, in CSS pixels from the canvas's top-left corner.
  window.marrowlensMap = {
    screenOf: (cellId) => {
      const p = points.find((q) => q.cell_id === cellId);
      return p && view ? toScreen(p) : null;
    },
    cellIds: () => points.map((p) => p.cell_id),
  };
})();
