// The interactive plan report (planner/report_html.py): plain JavaScript, no framework, no network.
// It reads the JSON block #report-data and draws: the simulated schedule per device (SVG, zoom with
// the wheel or the buttons, a tooltip per action), memory per device stacked by part against the
// usable limit, the sortable baselines-and-alternatives table, and the what-if table.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const DATA = JSON.parse(document.getElementById("report-data").textContent);
const KIND_COLOUR = { F: "#1f77b4", I: "#ff7f0e", W: "#2ca02c", B: "#d62728" };
const KIND_LIGHT = { F: "#8fbbd9", I: "#ffbf86", W: "#95cf95", B: "#ea9393" };
const KIND_NAME = { F: "forward", I: "backward (input gradient)", W: "backward (weight gradient)", B: "backward" };
const PART_COLOUR = ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd", "#8c8c8c"];
const tooltip = document.getElementById("tooltip");

function el(name, attrs, parent) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

// Bytes as the page prints them everywhere (report_html.format_bytes is the same rule in Python).
function formatBytes(b) {
  if (b === 0) return "0";
  return b >= 2 ** 30 ? (b / 2 ** 30).toFixed(2) + " GiB" : (b / 2 ** 20).toFixed(1) + " MiB";
}

function formatSeconds(s) {
  if (s === 0) return "0";
  if (s >= 1) return s.toFixed(3) + " s";
  if (s >= 1e-3) return (s * 1e3).toFixed(2) + " ms";
  return (s * 1e6).toFixed(1) + " µs";
}

function showTip(event, text) {
  tooltip.textContent = text;
  tooltip.style.display = "block";
  tooltip.style.left = event.clientX + 14 + "px";
  tooltip.style.top = event.clientY + 12 + "px";
}

function hideTip() { tooltip.style.display = "none"; }

function niceTicks(lo, hi, count) {
  const span = hi - lo || 1;
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((f) => f * mag).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-12 * span; t += step) out.push(t);
  return out;
}

// ---- timeline ----------------------------------------------------------------------------------
function drawTimeline() {
  const tl = DATA.timeline;
  const host = document.getElementById("timeline");
  const rowH = 26, left = 48, right = 12, top = 8, axisH = 28;
  const width = Math.max(host.clientWidth, 600);
  const plotW = width - left - right;
  const height = top + tl.devices.length * rowH + axisH;
  const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}` }, host);
  el("rect", { x: left, y: top, width: plotW, height: tl.devices.length * rowH }, el("clipPath", { id: "plot-clip" }, svg));
  const axis = el("g", { class: "axis" }, svg);
  const plot = el("g", { "clip-path": "url(#plot-clip)" }, svg);
  const view = { lo: 0, hi: tl.end_s };
  const bars = [];
  tl.devices.forEach((actions, d) => {
    const y = top + d * rowH;
    const row = el("g", { class: "device-row", "data-device": d }, plot);
    el("rect", { class: "idle", x: left, y: y + 3, width: plotW, height: rowH - 6 }, row);
    const label = el("text", { class: "row-label", x: left - 8, y: y + rowH / 2 + 4, "text-anchor": "end" }, svg);
    label.textContent = "d" + d;
    for (const [start, end, text, second] of actions) {
      const m = /^(\d+)([FIWB])(\d+)$/.exec(text);
      const [stage, kind, mb] = [Number(m[1]), m[2], Number(m[3])];
      const rect = el("rect", {
        class: "action", y: y + 3, height: rowH - 6, fill: (second ? KIND_LIGHT : KIND_COLOUR)[kind],
        "data-action": text, "data-device": d, "data-microbatch": mb, "data-start": start, "data-end": end,
      }, row);
      const tip = `device ${d}: ${text}\n${KIND_NAME[kind]} of stage ${stage}, micro-batch ${mb}\n` +
        `start ${formatSeconds(start)}, end ${formatSeconds(end)} (${formatSeconds(end - start)})`;
      rect.addEventListener("mousemove", (e) => showTip(e, tip));
      rect.addEventListener("mouseleave", hideTip);
      const mbText = el("text", { class: "mb-label", y: y + rowH / 2 + 3, "text-anchor": "middle" }, row);
      mbText.textContent = mb;
      bars.push([rect, mbText, start, end]);
    }
  });
  for (const x of tl.window_s || []) {
    bars.push([el("line", { class: "limit", y1: top, y2: top + tl.devices.length * rowH }, plot), null, x, x]);
  }
  function render() {
    const scale = plotW / (view.hi - view.lo);
    for (const [node, text, start, end] of bars) {
      const x = left + (start - view.lo) * scale;
      const w = Math.max((end - start) * scale, 0);
      if (node.tagName === "line") {
        node.setAttribute("x1", x);
        node.setAttribute("x2", x);
        continue;
      }
      node.setAttribute("x", x);
      node.setAttribute("width", w);
      text.setAttribute("x", x + w / 2);
      text.style.display = w > 14 ? "" : "none";
    }
    axis.replaceChildren();
    const y0 = top + tl.devices.length * rowH;
    el("line", { x1: left, x2: left + plotW, y1: y0, y2: y0 }, axis);
    for (const t of niceTicks(view.lo, view.hi, 8)) {
      const x = left + (t - view.lo) * scale;
      el("line", { x1: x, x2: x, y1: y0, y2: y0 + 4 }, axis);
      const label = el("text", { x, y: y0 + 16, "text-anchor": "middle" }, axis);
      label.textContent = formatSeconds(t);
    }
    document.getElementById("zoom-level").textContent =
      `showing ${formatSeconds(view.lo)} to ${formatSeconds(view.hi)} (zoom ${(tl.end_s / (view.hi - view.lo)).toFixed(1)}x)`;
  }
  function zoom(factor, at) {
    const span = Math.min((view.hi - view.lo) / factor, tl.end_s);
    const lo = Math.min(Math.max(at - (at - view.lo) / factor, 0), tl.end_s - span);
    view.lo = lo;
    view.hi = lo + span;
    render();
  }
  svg.addEventListener("wheel", (e) => {
    e.preventDefault();
    const box = svg.getBoundingClientRect();
    const frac = Math.min(Math.max((e.clientX - box.left - left) / plotW, 0), 1);
    zoom(e.deltaY < 0 ? 1.25 : 0.8, view.lo + frac * (view.hi - view.lo));
  }, { passive: false });
  document.getElementById("zoom-in").addEventListener("click", () => zoom(2, (view.lo + view.hi) / 2));
  document.getElementById("zoom-out").addEventListener("click", () => zoom(0.5, (view.lo + view.hi) / 2));
  document.getElementById("zoom-reset").addEventListener("click", () => { view.lo = 0; view.hi = tl.end_s; render(); });
  render();
  const legend = document.getElementById("timeline-legend");
  const kinds = new Set(tl.devices.flat().map((a) => /[FIWB]/.exec(a[2])[0]));
  for (const k of "FIWB") {
    if (!kinds.has(k)) continue;
    const item = document.createElement("span");
    item.style.setProperty("--c", KIND_COLOUR[k]);
    item.textContent = `${k} ${KIND_NAME[k]}`;
    legend.appendChild(item);
  }
  if (tl.devices.some((row) => row.some((a) => a[3]))) {
    const light = document.createElement("span");
    light.style.setProperty("--c", "#bbbbbb");
    light.textContent = "light shade: later model chunks (or the second pipeline)";
    legend.appendChild(light);
  }
  const idle = document.createElement("span");
  idle.style.setProperty("--c", "#eceef2");
  idle.textContent = "idle (bubble)";
  legend.appendChild(idle);
}

// ---- memory ------------------------------------------------------------------------------------
function drawMemory() {
  const mem = DATA.memory;
  const host = document.getElementById("memory");
  const left = 78, right = 16, top = 22, bottom = 34;
  const barW = Math.min(64, Math.max(18, 640 / mem.devices.length));
  const gap = barW * 0.5;
  const width = Math.max(host.clientWidth, left + right + mem.devices.length * (barW + gap));
  const height = 300;
  const plotH = height - top - bottom;
  const most = Math.max(...mem.devices.map((d) => d.total), mem.limit_bytes || 0) * 1.08 || 1;
  const yOf = (b) => top + plotH - (b / most) * plotH;
  const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}` }, host);
  const axis = el("g", { class: "axis" }, svg);
  el("line", { x1: left, x2: left, y1: top, y2: top + plotH }, axis);
  const unit = most >= 2 ** 30 ? 2 ** 30 : 2 ** 20;  // ticks at round GiB or MiB
  for (const t of niceTicks(0, most / unit, 5).map((u) => u * unit)) {
    el("line", { x1: left - 4, x2: left, y1: yOf(t), y2: yOf(t) }, axis);
    const label = el("text", { x: left - 7, y: yOf(t) + 4, "text-anchor": "end" }, axis);
    label.textContent = formatBytes(t);
  }
  mem.devices.forEach((dev, i) => {
    const x = left + gap / 2 + i * (barW + gap);
    const bar = el("g", { class: "memory-bar", "data-device": dev.device, "data-total-bytes": dev.total }, svg);
    let below = 0;
    mem.parts.forEach((part, j) => {
      const bytes = dev.parts[part] || 0;
      if (bytes <= 0) return;
      const seg = el("rect", {
        class: "segment", x, width: barW, y: yOf(below + bytes), height: yOf(below) - yOf(below + bytes),
        fill: PART_COLOUR[j % PART_COLOUR.length], "data-part": part, "data-bytes": bytes,
      }, bar);
      const tip = `device ${dev.device}: ${part} ${formatBytes(bytes)} (${bytes} bytes)\n` +
        `total ${formatBytes(dev.total)}${dev.binding ? ", binding: " + dev.binding : ""}`;
      seg.addEventListener("mousemove", (e) => showTip(e, tip));
      seg.addEventListener("mouseleave", hideTip);
      below += bytes;
    });
    const label = el("text", { class: "bar-label memory-total", x: x + barW / 2, y: yOf(dev.total) - 5,
                               "text-anchor": "middle", "data-bytes": dev.total }, bar);
    label.textContent = formatBytes(dev.total);
    const name = el("text", { class: "bar-label", x: x + barW / 2, y: top + plotH + 16, "text-anchor": "middle" }, svg);
    name.textContent = "d" + dev.device;
  });
  if (mem.limit_bytes) {
    const y = yOf(mem.limit_bytes);
    el("line", { class: "limit", x1: left, x2: width - right, y1: y, y2: y, "data-bytes": mem.limit_bytes }, svg);
    const label = el("text", { class: "limit-label", x: width - right, y: y - 4, "text-anchor": "end" }, svg);
    label.textContent = "usable " + formatBytes(mem.limit_bytes);
  }
  const legend = document.getElementById("memory-legend");
  mem.parts.forEach((part, j) => {
    const item = document.createElement("span");
    item.style.setProperty("--c", PART_COLOUR[j % PART_COLOUR.length]);
    item.textContent = part;
    legend.appendChild(item);
  });
}

// ---- tables ------------------------------------------------------------------------------------
function cell(row, value, kind) {
  const td = document.createElement("td");
  if (value === null || value === undefined) {
    td.textContent = "—";
  } else if (kind === "seconds") {
    td.textContent = value.toPrecision(4) + " s";
  } else if (kind === "percent") {
    td.textContent = (100 * value).toFixed(1) + "%";
  } else if (kind === "bytes") {
    td.textContent = formatBytes(value);
  } else if (kind === "ratio") {
    td.textContent = value.toFixed(3) + "x";
  } else {
    td.textContent = String(value);
  }
  if (kind && kind !== "text") td.className = "num";
  td.dataset.value = value === null || value === undefined ? "" : value;
  row.appendChild(td);
}

function sortableTable(id, columns, rows) {
  const table = document.getElementById(id);
  const head = table.createTHead().insertRow();
  const body = table.createTBody();
  for (const r of rows) {
    const tr = body.insertRow();
    if (r.kind === "this plan") tr.className = "plan";
    for (const c of columns) cell(tr, r[c.key], c.type);
  }
  columns.forEach((c, i) => {
    const th = document.createElement("th");
    th.textContent = c.title;
    th.addEventListener("click", () => {
      const asc = !th.classList.contains("sorted-asc");
      for (const other of head.cells) other.classList.remove("sorted-asc", "sorted-desc");
      th.classList.add(asc ? "sorted-asc" : "sorted-desc");
      const numeric = c.type !== "text";
      const key = (tr) => tr.cells[i].dataset.value;
      const sorted = Array.from(body.rows).sort((a, b) => {
        const [x, y] = [key(a), key(b)];
        if (x === "" || y === "") return (x === "") - (y === "");  // blanks last either way
        const d = numeric ? Number(x) - Number(y) : x.localeCompare(y);
        return asc ? d : -d;
      });
      body.replaceChildren(...sorted);
    });
    head.appendChild(th);
  });
}

function drawTables() {
  sortableTable("alternatives", [
    { key: "kind", title: "kind", type: "text" }, { key: "name", title: "name", type: "text" },
    { key: "config", title: "configuration", type: "text" }, { key: "step_time_s", title: "step", type: "seconds" },
    { key: "mfu", title: "MFU", type: "percent" }, { key: "peak_memory_bytes", title: "peak memory", type: "bytes" },
    { key: "vs_plan", title: "step / plan's", type: "ratio" }, { key: "fits", title: "fits", type: "text" },
  ], DATA.rows);
  if (DATA.what_if.length) {
    sortableTable("what-if", [
      { key: "change", title: "what if", type: "text" }, { key: "config", title: "re-planned configuration", type: "text" },
      { key: "devices", title: "devices", type: "count" }, { key: "step_time_s", title: "step", type: "seconds" },
      { key: "throughput_ratio", title: "throughput / now", type: "ratio" },
      { key: "peak_memory_bytes", title: "peak memory", type: "bytes" }, { key: "note", title: "note", type: "text" },
    ], DATA.what_if);
  }
}

window.addEventListener("DOMContentLoaded", () => {
  drawTimeline();
  drawMemory();
  drawTables();
  document.body.dataset.rendered = "yes";
});
