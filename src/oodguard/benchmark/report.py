"""One self-contained HTML report: leaderboard with intervals, per-set table with intervals, ROC overlay of the best
detectors, ROC curves and score histograms per detector and OOD set, and what was not run.

The page embeds its data as JSON and draws SVG with a few lines of plain JavaScript: no network, no
external files, and it opens anywhere.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from oodguard import metrics, persist
from oodguard.plot import robust_range

if TYPE_CHECKING:
    from oodguard.benchmark.results import Results

ROC_POINTS = 200
HISTOGRAM_BINS = 40
#: Quantiles of the pooled ID and OOD-set scores that bound each histogram panel.
HISTOGRAM_CLIP = (0.01, 0.99)


def roc_curve(id_scores: np.ndarray, ood_scores: np.ndarray, max_points: int = ROC_POINTS) -> dict[str, list]:
    """:func:`oodguard.metrics.roc_curve` (OOD positive, one point per distinct score), thinned to about
    ``max_points`` points (keeping both ends) and rounded for the page."""
    fpr, tpr, _ = metrics.roc_curve(id_scores, ood_scores)
    if len(fpr) > max_points:
        keep = np.unique(np.r_[np.linspace(0, len(fpr) - 1, max_points).astype(int), len(fpr) - 1])
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": np.round(fpr, 4).tolist(), "tpr": np.round(tpr, 4).tolist()}


def histograms(scores: dict[str, np.ndarray], bins: int = HISTOGRAM_BINS) -> dict[str, dict[str, object]]:
    """Per OOD set, the ID and that set's score fractions per bin, on bins of their own robust range.

    Each panel spans the 1-99 % quantiles of the ID scores and that set's scores pooled (so one heavy-tailed
    set cannot squash the others), with the scores beyond counted and drawn in the end bins. When even that range
    is heavy-tailed (the middle 90 % of one set fits in two bins of equal width), the bins are equal on a symmetric
    log scale centred on that set (``"scale": "symlog"``), so that set is spread over many bins and the tail of the
    other still shows; ``edges`` are the bin edges in score units either way.
    """
    id_scores = np.asarray(scores["id"], dtype=np.float64)
    panels: dict[str, dict[str, object]] = {}
    for name, values in scores.items():
        if name == "id":
            continue
        values = np.asarray(values, dtype=np.float64)
        low, high = robust_range([id_scores, values], HISTOGRAM_CLIP)
        edges, scale = _bin_edges([id_scores, values], low, high, bins)
        panel: dict[str, object] = {"edges": [float(f"{e:.9g}") for e in edges], "scale": scale}
        for key, part in (("id", id_scores), ("ood", values)):
            counts, _ = np.histogram(np.clip(part, low, high), bins=edges)
            panel[key] = np.round(counts / max(1, len(part)), 5).tolist()
            panel[f"{key}_clipped"] = int(((part < low) | (part > high)).sum())
        panels[name] = panel
    return panels


def _bin_edges(sets: list[np.ndarray], low: float, high: float, bins: int) -> tuple[np.ndarray, str]:
    """Equal bins on [low, high]; on a symmetric log scale when one set's 90 % body would fit in two of them."""
    width = (high - low) / bins
    narrowest: tuple[float, float, float] | None = None  # (body, quartile distance, median) of the narrowest set
    for values in sets:
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        q05, q25, q50, q75, q95 = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
        if q95 > q05 and (narrowest is None or q95 - q05 < narrowest[0]):
            narrowest = (float(q95 - q05), float(q75 - q25), float(q50))
    if narrowest is None or narrowest[0] >= 2 * width:  # a constant set stays a spike on a linear axis
        return np.linspace(low, high, bins + 1), "linear"
    body, quartiles, center = narrowest
    unit = (quartiles if quartiles > 0 else body) / 2  # linear within the narrow set, logarithmic beyond

    def forward(x: np.ndarray) -> np.ndarray:
        return np.sign(x - center) * np.log1p(np.abs(x - center) / unit)

    start, stop = forward(np.array([low, high]))
    steps = np.linspace(start, stop, bins + 1)
    edges = center + np.sign(steps) * unit * np.expm1(np.abs(steps))
    edges[0], edges[-1] = low, high  # exact ends, so the clipped scores land in the end bins
    return edges, "symlog"


def _id_scores(results: Results, scores: dict[str, np.ndarray]) -> np.ndarray:
    """The ID scores the run's metrics used: the ID test set, plus the covariate sets in the full-spectrum protocol."""
    id_scores = np.asarray(scores["id"], dtype=np.float64)
    if not results.full_spectrum:
        return id_scores
    evaluated = {name for names in results.groups.values() for name in names}
    covariate = [np.asarray(v, dtype=np.float64) for k, v in scores.items() if k != "id" and k not in evaluated]
    return np.concatenate([id_scores, *covariate])


def group_intervals(results: Results, confidence: float = 0.95) -> dict[str, dict[str, list[float]]]:
    """Per detector, the percentile interval of its mean AUROC over each group's OOD sets (the leaderboard's number).

    A group of one OOD set keeps the run's interval of that set (``auroc_low``, ``auroc_high`` of the table). For a
    larger group, a paired bootstrap of the per-sample scores (:func:`oodguard.metrics.paired_bootstrap`, the run's
    ``n_boot`` and ``seed``): every replicate resamples the ID scores and each OOD set once, and the group mean of that
    replicate's AUROCs is one draw. In the full-spectrum protocol the covariate sets join the ID scores, as in the run.
    A detector whose scores cannot be resampled (non-finite) gets no interval for such a group.
    """
    n_boot = int(results.settings.get("n_boot", 200))
    seed = results.settings.get("seed", 0)
    larger = {group: names for group, names in results.groups.items() if len(names) > 1}
    table = results.table.set_index(["detector", "ood_set"])
    intervals: dict[str, dict[str, list[float]]] = {}
    for detector, scores in results.scores.items():
        found: dict[str, tuple[float, float]] = {}
        for group, names in results.groups.items():
            if len(names) == 1 and (detector, names[0]) in table.index:
                row = table.loc[(detector, names[0])]
                found[f"{group} AUROC"] = (float(row["auroc_low"]), float(row["auroc_high"]))
        sets = [name for names in larger.values() for name in names if name in scores]
        if sets:
            try:
                draws = metrics.paired_bootstrap(
                    [_id_scores(results, scores)], [[scores[name]] for name in sets], "auroc", n_boot, seed
                )
            except ValueError:
                draws = None
            for group, names in larger.items():
                if draws is not None and all(name in sets for name in names):
                    means = draws[1:, 0, [sets.index(name) for name in names]].mean(axis=1)
                    found[f"{group} AUROC"] = metrics.percentile_interval(means, confidence)
        intervals[detector] = {
            column: [round(low, 4), round(high, 4)]
            for column, (low, high) in found.items()
            if np.isfinite([low, high]).all()
        }
    return intervals


def report_data(results: Results) -> dict[str, object]:
    board = results.leaderboard()
    detectors = {}
    for name, scores in results.scores.items():
        table = results.table[results.table["detector"] == name]
        id_scores = _id_scores(results, scores)  # so each curve's area is the AUROC shown beside it
        detectors[name] = {
            "roc": {row.ood_set: roc_curve(id_scores, scores[row.ood_set]) for row in table.itertuples()},
            "hist": histograms(scores),
            "rows": table.drop(columns=["detector"]).round(4).to_dict(orient="records"),
        }
    return {
        "benchmark": results.benchmark,
        "id_accuracy": results.id_accuracy,
        "full_spectrum": results.full_spectrum,
        "groups": results.groups,
        "leaderboard": json.loads(board.to_json(orient="records")),
        "detectors": detectors,
        "settings": results.settings,
        "skipped": dict(sorted(getattr(results, "skipped", {}).items())),
        "views": json.loads(results.views.to_json(orient="records")),
        "diagnostics": getattr(results, "diagnostics", {}) or {},
        "per_set": json.loads(results.table.round(4).to_json(orient="records")),
        "intervals": group_intervals(results),
    }


def write_report(results: Results, path: str | Path) -> Path:
    """Write the HTML report to ``path`` and return it."""
    path = Path(path)
    data = json.dumps(report_data(results), allow_nan=False, default=str).replace("</", "<\\/")
    title = html.escape(f"oodguard — {results.benchmark}")
    persist.write_bytes_atomic(path, _TEMPLATE.replace("__TITLE__", title).replace("__DATA__", data).encode())
    return path


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1180px; color: #1d2330; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.note { color: #5a6270; font-size: 13px; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 8px; border-bottom: 1px solid #e3e6eb; text-align: right; white-space: nowrap; }
th { background: #f4f6f9; cursor: pointer; white-space: normal; vertical-align: bottom; }
td:nth-child(2), th:nth-child(2) { text-align: left; }
#perset-table td:first-child, #perset-table th:first-child, #views-table td:first-child, #views-table th:first-child { text-align: left; }
#perset-table td:nth-child(2), #perset-table th:nth-child(2), #views-table td:nth-child(2), #views-table th:nth-child(2) { text-align: right; }
.ci { display: block; color: #5a6270; font-size: 11px; line-height: 1.2; }
tr.sel td { outline: 2px solid #3b6fd8; } tr:hover td { background: #f0f4ff; }
.failed td { color: #a03030; text-align: left; white-space: normal; max-width: 640px; }
.grid { display: flex; flex-wrap: wrap; gap: 14px; } .panel { border: 1px solid #e3e6eb; border-radius: 6px; padding: 6px; }
.panel h3 { font-size: 13px; margin: 0 0 4px; font-weight: 600; }
svg text { font-size: 11px; fill: #3a4150; } select { font-size: 14px; padding: 2px 6px; }
#errors { color: #b00020; white-space: pre-wrap; } #perset, #leaderboard { overflow-x: auto; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<div class="note" id="summary"></div>
<div id="errors"></div>
<h2>Leaderboard</h2>
<div class="note">Click a detector to see its curves; click a column header to sort. AUROC (higher is better) and
FPR@95 (% of OOD accepted when 95&nbsp;% of ID is kept; lower is better), unweighted means over each group's
OOD sets, with the 95&nbsp;% interval of each AUROC mean below it (a paired bootstrap of the per-sample scores:
every replicate resamples the ID set and each OOD set once). Colour: green is better.</div>
<div id="leaderboard"></div>
<div id="notrun"></div>
<div id="views"></div>
<div id="ocs"></div>
<div id="explain"></div>
<h2>Per OOD set <select id="persetmetric"><option value="auroc">AUROC</option><option value="fpr95">FPR@95</option></select></h2>
<div class="note">Per detector and OOD set (rows in leaderboard order), with the 95&nbsp;% bootstrap interval below.</div>
<div id="perset"></div>
<h2>ROC overlay <select id="setpicker"></select></h2>
<div class="note">The five best detectors of the leaderboard on one OOD set.</div>
<div class="grid"><div class="panel"><div id="overlay"></div></div></div>
<h2>Detector <select id="picker"></select></h2>
<div id="detail"></div>
<div class="grid">
  <div class="panel"><h3>ROC curves (OOD positive)</h3><div id="roc"></div></div>
</div>
<h2>Score histograms (higher score = more OOD)</h2>
<div class="grid" id="hists"></div>
<script id="report-data" type="application/json">__DATA__</script>
<script>
"use strict";
window.addEventListener("error", e => { document.getElementById("errors").textContent += "Error: " + e.message + "\\n"; });
const DATA = JSON.parse(document.getElementById("report-data").textContent);
const COLORS = ["#d1495b", "#edae49", "#00798c", "#30638e", "#8e6c8a", "#66a182", "#c17c74", "#6b705c",
                "#e07a5f", "#3d405b", "#81b29a", "#b5838d"];
const NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, parent, text) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  if (parent) parent.appendChild(node);
  return node;
}
function interval(cell, low, high) {  // the interval as a small second line of a table cell
  const span = document.createElement("span"); span.className = "ci"; span.textContent = `${pct(low)}–${pct(high)}`;
  cell.appendChild(span);
}
function pct(v) { return (v === null || v === undefined || Number.isNaN(v)) ? "" : (100 * v).toFixed(2); }
function compact(v, digits) {  // 0.123, 45.6, 1.23e5, -4.5e-3
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e4 || a < 1e-2)) return v.toExponential(digits - 1).replace("e+", "e");
  return String(Number(v.toPrecision(digits)));
}
function ticks(values) {  // the fewest significant digits (3 or more) that tell every tick apart
  for (let digits = 3; digits < 12; digits++) {
    const labels = values.map(v => compact(v, digits));
    if (new Set(labels).size === labels.length) return labels;
  }
  return values.map(v => String(v));
}
function shade(v, higherBetter) {
  if (v === null || v === undefined) return "";
  const good = higherBetter ? Math.max(0, Math.min(1, (v - 0.5) / 0.5)) : Math.max(0, Math.min(1, 1 - v));
  return `hsl(${Math.round(120 * good)}, 60%, 88%)`;
}
const board = DATA.leaderboard;
// the ambiguous group is not OOD: it is shown with the other views beside OOD (renderViews)
const metricCols = Object.keys(board[0] || {}).filter(c => (c.endsWith("AUROC") || c.endsWith("FPR@95")) && !c.startsWith("ambiguous "));
let sortCol = null, sortDesc = true;
function renderBoard(selected) {
  const rows = board.slice();
  if (sortCol) rows.sort((a, b) => ((a[sortCol] ?? -1e9) - (b[sortCol] ?? -1e9)) * (sortDesc ? -1 : 1));
  const table = document.createElement("table");
  const head = table.insertRow();
  ["rank", "detector", ...metricCols].forEach(c => {
    const th = document.createElement("th"); th.textContent = c; head.appendChild(th);
    if (metricCols.includes(c)) th.onclick = () => { sortDesc = sortCol === c ? !sortDesc : c.endsWith("AUROC"); sortCol = c; renderBoard(selected); };
  });
  rows.forEach((r, i) => {
    const tr = table.insertRow();
    if (r.status !== "ok") {
      tr.className = "failed";
      tr.insertCell().textContent = "-"; tr.insertCell().textContent = r.detector;
      const td = tr.insertCell(); td.colSpan = metricCols.length; td.textContent = "failed: " + r.error;
      return;
    }
    if (r.detector === selected) tr.className = "sel";
    tr.insertCell().textContent = i + 1; tr.insertCell().textContent = r.detector;
    const ci = (DATA.intervals || {})[r.detector] || {};
    metricCols.forEach(c => {
      const td = tr.insertCell(); td.textContent = pct(r[c]); td.style.background = shade(r[c], c.endsWith("AUROC"));
      if (ci[c]) interval(td, ci[c][0], ci[c][1]);
    });
    tr.onclick = () => select(r.detector);
  });
  const holder = document.getElementById("leaderboard"); holder.innerHTML = ""; holder.appendChild(table);
}
function axes(svg, w, h, m, xr, yr, xlabel, ylabel, xvalues) {  // xvalues: ticks evenly spaced along the axis
  el("line", {x1: m, y1: h - m, x2: w - 8, y2: h - m, stroke: "#888"}, svg);
  el("line", {x1: m, y1: 8, x2: m, y2: h - m, stroke: "#888"}, svg);
  const steps = [0, 0.5, 1], xv = xvalues || steps.map(t => xr[0] + t * (xr[1] - xr[0])), xs = ticks(xv);
  xs.forEach((label, i) => {  // the end labels are anchored inside the plot, so none is cut off
    const t = i / (xs.length - 1), anchor = i === 0 ? "start" : i === xs.length - 1 ? "end" : "middle";
    el("text", {x: m + t * (w - m - 8), y: h - m + 14, "text-anchor": anchor, class: "xtick"}, svg, label);
  });
  const ys = ticks(steps.map(t => yr[0] + t * (yr[1] - yr[0])));
  steps.forEach((t, i) => el("text", {x: m - 4, y: h - m - t * (h - m - 8) + 4, "text-anchor": "end", class: "ytick"}, svg, ys[i]));
  el("text", {x: (w + m) / 2, y: h - 4, "text-anchor": "middle"}, svg, xlabel);
  el("text", {x: 10, y: h / 2, transform: `rotate(-90 10 ${h / 2})`, "text-anchor": "middle"}, svg, ylabel);
}
function drawRoc(name) {
  const d = DATA.detectors[name], holder = document.getElementById("roc"); holder.innerHTML = "";
  const w = 520, h = 360, m = 46, svg = el("svg", {width: w + 200, height: h});
  axes(svg, w, h, m, [0, 1], [0, 1], "false positive rate (ID flagged)", "true positive rate (OOD flagged)");
  const sx = x => m + x * (w - m - 8), sy = y => h - m - y * (h - m - 8);
  el("line", {x1: sx(0), y1: sy(0), x2: sx(1), y2: sy(1), stroke: "#ccc", "stroke-dasharray": "4 3"}, svg);
  d.rows.forEach((row, i) => {
    const c = d.roc[row.ood_set], color = COLORS[i % COLORS.length];
    el("polyline", {points: c.fpr.map((x, j) => `${sx(x).toFixed(1)},${sy(c.tpr[j]).toFixed(1)}`).join(" "),
                    fill: "none", stroke: color, "stroke-width": 1.8}, svg);
    el("rect", {x: w + 10, y: 14 + 18 * i, width: 12, height: 12, fill: color}, svg);
    el("text", {x: w + 28, y: 24 + 18 * i}, svg, `${row.ood_set} (${pct(row.auroc)})`);
  });
  holder.appendChild(svg);
}
function drawHists(name) {
  const d = DATA.detectors[name], holder = document.getElementById("hists"); holder.innerHTML = "";
  d.rows.forEach((row, i) => {
    const hist = d.hist[row.ood_set], edges = hist.edges, n = edges.length - 1;
    const panel = document.createElement("div"); panel.className = "panel"; panel.dataset.set = row.ood_set;
    const title = document.createElement("h3");
    title.textContent = `${row.ood_set} (${row.group}) — AUROC ${pct(row.auroc)} [${pct(row.auroc_low)}, ${pct(row.auroc_high)}], FPR@95 ${pct(row.fpr95)}`;
    panel.appendChild(title);
    const w = 372, h = 190, m = 62, svg = el("svg", {width: w, height: h});
    const a = hist.id, b = hist.ood;
    const top = 1.3 * Math.max(...a, ...b, 1e-9);  // headroom for the two legend lines
    const symlog = hist.scale === "symlog", xticks = [0, 1, 2, 3, 4].map(k => edges[Math.round(k * n / 4)]);
    axes(svg, w, h, m, [edges[0], edges[n]], [0, top], symlog ? "score (symmetric log scale)" : "score", "fraction", xticks);
    const bw = (w - m - 8) / n;
    [[a, "#3b6fd8"], [b, COLORS[i % COLORS.length]]].forEach(([values, color]) => values.forEach((v, j) => {
      const bh = (v / top) * (h - m - 8);
      el("rect", {x: m + j * bw, y: h - m - bh, width: Math.max(bw - 0.5, 0.5), height: bh, fill: color, "fill-opacity": 0.55}, svg);
    }));
    const clip = (k) => k ? ` (${k} beyond, in the end bins)` : "";
    el("text", {x: w - 10, y: 16, "text-anchor": "end", fill: "#3b6fd8"}, svg, "ID test" + clip(hist.id_clipped));
    el("text", {x: w - 10, y: 30, "text-anchor": "end"}, svg, row.ood_set + clip(hist.ood_clipped));
    panel.appendChild(svg); holder.appendChild(panel);
  });
}
function renderPerSet(metric) {
  const sets = [...new Set(DATA.per_set.map(r => r.ood_set))];
  const table = document.createElement("table"); table.id = "perset-table";
  const head = table.insertRow();
  ["detector", ...sets].forEach(c => { const th = document.createElement("th"); th.textContent = c; head.appendChild(th); });
  board.filter(r => r.status === "ok").forEach(r => {
    const tr = table.insertRow(); tr.insertCell().textContent = r.detector;
    sets.forEach(set => {
      const row = DATA.per_set.find(x => x.detector === r.detector && x.ood_set === set), td = tr.insertCell();
      if (!row) return;
      td.textContent = pct(row[metric]);
      interval(td, row[metric + "_low"], row[metric + "_high"]);
      td.style.background = shade(row[metric], metric === "auroc");
      td.title = `AUROC ${pct(row.auroc)}, FPR@95 ${pct(row.fpr95)} (${row.group})`;
    });
  });
  table.dataset.metric = metric;
  const holder = document.getElementById("perset"); holder.innerHTML = ""; holder.appendChild(table);
}
function drawOverlay(set) {
  const holder = document.getElementById("overlay"); holder.innerHTML = "";
  const chosen = board.filter(r => r.status === "ok" && DATA.detectors[r.detector] && DATA.detectors[r.detector].roc[set]).slice(0, 5);
  const w = 520, h = 360, m = 46, svg = el("svg", {width: w + 220, height: h, id: "overlay-svg"});
  axes(svg, w, h, m, [0, 1], [0, 1], "false positive rate (ID flagged)", "true positive rate (OOD flagged)");
  const sx = x => m + x * (w - m - 8), sy = y => h - m - y * (h - m - 8);
  el("line", {x1: sx(0), y1: sy(0), x2: sx(1), y2: sy(1), stroke: "#ccc", "stroke-dasharray": "4 3"}, svg);
  chosen.forEach((r, i) => {
    const c = DATA.detectors[r.detector].roc[set], color = COLORS[i % COLORS.length];
    const row = DATA.per_set.find(x => x.detector === r.detector && x.ood_set === set);
    el("polyline", {points: c.fpr.map((x, j) => `${sx(x).toFixed(1)},${sy(c.tpr[j]).toFixed(1)}`).join(" "),
                    fill: "none", stroke: color, "stroke-width": 1.8}, svg);
    el("rect", {x: w + 10, y: 14 + 18 * i, width: 12, height: 12, fill: color}, svg);
    el("text", {x: w + 28, y: 24 + 18 * i}, svg, `${r.detector} (${pct(row ? row.auroc : null)})`);
  });
  holder.appendChild(svg);
}
function renderNotRun() {
  const holder = document.getElementById("notrun"), skipped = Object.entries(DATA.skipped || {});
  const failed = board.filter(r => r.status !== "ok");
  if (!skipped.length && !failed.length) return;
  const title = document.createElement("h2"); title.textContent = `Not run (${skipped.length}) and failed (${failed.length})`;
  holder.appendChild(title);
  const list = document.createElement("ul"); list.id = "notrun-list";
  skipped.forEach(([name, reason]) => { const li = document.createElement("li"); li.textContent = `${name}: ${reason}`; list.appendChild(li); });
  failed.forEach(r => { const li = document.createElement("li"); li.className = "failed"; li.textContent = `${r.detector} failed: ${r.error}`; list.appendChild(li); });
  holder.appendChild(list);
}
function renderViews() {  // misclassified and ambiguous inputs, in leaderboard order
  const views = DATA.views || [], holder = document.getElementById("views");
  const cols = Object.keys(views[0] || {}).filter(c => c !== "detector" && views.some(r => r[c] !== null && r[c] !== undefined));
  if (!cols.length) return;
  const title = document.createElement("h2"); title.textContent = "Beside OOD: misclassified and ambiguous inputs"; holder.appendChild(title);
  const note = document.createElement("div"); note.className = "note";
  note.textContent = "misclassified AUROC: misclassified ID test inputs vs correctly classified ones. ambiguous AUROC: " +
    "truly ambiguous inputs (between two ID classes) vs ID. OOD vs ambiguous AUROC: near and far OOD sets vs the " +
    "ambiguous inputs, about 50 when a detector cannot tell novelty from ambiguity.";
  holder.appendChild(note);
  const byName = Object.fromEntries(views.map(r => [r.detector, r]));
  const table = document.createElement("table"); table.id = "views-table";
  const head = table.insertRow();
  ["detector", ...cols].forEach(c => { const th = document.createElement("th"); th.textContent = c; head.appendChild(th); });
  board.filter(r => r.status === "ok" && byName[r.detector]).forEach(r => {
    const tr = table.insertRow(); tr.insertCell().textContent = r.detector;
    cols.forEach(c => { const td = tr.insertCell(); td.textContent = pct(byName[r.detector][c]); td.style.background = shade(byName[r.detector][c], true); });
  });
  holder.appendChild(table);
}
function renderOcs() {  // the model's predictions against the optimal constant solution, by corruption severity
  const c = (DATA.diagnostics || {}).ocs_curve, holder = document.getElementById("ocs");
  if (!c) return;
  const title = document.createElement("h2"); title.textContent = "The model under corruption: distance to the OCS"; holder.appendChild(title);
  const note = document.createElement("div"); note.className = "note";
  note.textContent = `Mean KL(softmax || OCS) over the ${c.split} images, the OCS being the fit labels' distribution ` +
    "(Kang et al., ICLR 2024), per corruption at severities 0 (clean) to 5. Falling lines: the model's " +
    "predictions move towards the OCS as inputs shift, the premise of the ocs detector.";
  holder.appendChild(note);
  const w = 520, h = 300, m = 52, svg = el("svg", {width: w + 200, height: h, id: "ocs-plot"});
  const values = c.distance.flat(), low = Math.min(0, ...values), high = Math.max(...values) * 1.05 || 1;
  const last = c.severities[c.severities.length - 1];
  axes(svg, w, h, m, [0, last], [low, high], "corruption severity", "KL to the OCS", c.severities);
  const sx = x => m + x / last * (w - m - 8), sy = y => h - m - (y - low) / (high - low) * (h - m - 8);
  c.corruptions.forEach((name, i) => {
    const color = COLORS[i % COLORS.length];
    el("polyline", {points: c.severities.map((x, j) => `${sx(x).toFixed(1)},${sy(c.distance[i][j]).toFixed(1)}`).join(" "),
                    fill: "none", stroke: color, "stroke-width": 1.8}, svg);
    el("rect", {x: w + 10, y: 14 + 18 * i, width: 12, height: 12, fill: color}, svg);
    el("text", {x: w + 28, y: 24 + 18 * i}, svg, name);
  });
  const panel = document.createElement("div"); panel.className = "panel"; panel.appendChild(svg); holder.appendChild(panel);
}
function renderExplanations() {  // UA-Backprop maps of the highest-scoring inputs of each OOD set
  const e = (DATA.diagnostics || {}).explanations, holder = document.getElementById("explain");
  if (!e) return;
  const title = document.createElement("h2"); title.textContent = "What drives the OOD score"; holder.appendChild(title);
  const note = document.createElement("div"); note.className = "note"; holder.appendChild(note);
  if (e.skipped) { note.textContent = `Attribution maps not shown: ${e.skipped}.`; return; }
  note.textContent = `Per OOD set, the ${e.per_set} inputs with the highest ${e.detector} score (grey) and their ` +
    "UA-Backprop map (red: the positive part of gradient × input, channels summed; brighter raises the score " +
    "more; each map scaled to its own maximum, the images to one grey scale). See docs/explain.md.";
  const grid = document.createElement("div"); grid.className = "grid"; grid.id = "explain-grid";
  e.sets.forEach(set => {
    const panel = document.createElement("div"); panel.className = "panel";
    const h = document.createElement("h3"); h.textContent = `${set.name} (${set.group})`; panel.appendChild(h);
    set.images.forEach((image, i) => {
      const row = document.createElement("div");
      row.appendChild(pixels(image, false)); row.appendChild(pixels(set.maps[i], true));
      const score = document.createElement("span"); score.className = "note"; score.textContent = ` score ${set.scores[i]}`;
      row.appendChild(score); panel.appendChild(row);
    });
    grid.appendChild(panel);
  });
  holder.appendChild(grid);
}
function pixels(rows, heat) {  // a 0-255 grid on a canvas, 3 screen pixels per pixel; heat: black to orange
  const height = rows.length, width = rows[0].length, canvas = document.createElement("canvas");
  canvas.width = width; canvas.height = height;
  Object.assign(canvas.style, {width: `${3 * width}px`, height: `${3 * height}px`, imageRendering: "pixelated", marginRight: "4px"});
  const context = canvas.getContext("2d"), image = context.createImageData(width, height);
  rows.forEach((row, y) => row.forEach((v, x) => {
    const k = 4 * (y * width + x);
    image.data[k] = v; image.data[k + 1] = heat ? Math.round(0.45 * v) : v; image.data[k + 2] = heat ? 0 : v; image.data[k + 3] = 255;
  }));
  context.putImageData(image, 0, 0);
  return canvas;
}
function select(name) {
  if (!DATA.detectors[name]) return;
  document.getElementById("picker").value = name;
  renderBoard(name); drawRoc(name); drawHists(name);
}
(function main() {
  const s = DATA.settings || {};
  document.getElementById("summary").textContent =
    `ID accuracy ${pct(DATA.id_accuracy)} %; ${DATA.full_spectrum ? "full-spectrum protocol (covariate sets count as ID)" : "standard protocol"}; ` +
    `fitted on "${s.fit_split}", ID test "${s.id_split}"; 95 % bootstrap intervals from ${s.n_boot} replicates (seed ${s.seed}).`;
  const picker = document.getElementById("picker");
  board.filter(r => r.status === "ok").forEach(r => { const o = document.createElement("option"); o.value = o.textContent = r.detector; picker.appendChild(o); });
  picker.onchange = () => select(picker.value);
  const first = board.find(r => r.status === "ok");
  if (first) select(first.detector); else renderBoard(null);
  renderNotRun();
  renderViews();
  renderOcs();
  renderExplanations();
  const persetmetric = document.getElementById("persetmetric");
  persetmetric.onchange = () => renderPerSet(persetmetric.value);
  renderPerSet(persetmetric.value);
  const setpicker = document.getElementById("setpicker");
  [...new Set(DATA.per_set.map(r => r.ood_set))].forEach(set => { const o = document.createElement("option"); o.value = o.textContent = set; setpicker.appendChild(o); });
  setpicker.onchange = () => drawOverlay(setpicker.value);
  if (setpicker.options.length) drawOverlay(setpicker.options[0].value);
  document.body.dataset.rendered = "ok";
})();
</script>
</body>
</html>
"""
