"""The graph coloured by predicted time: a layered layout of the DAG, written as an SVG or one offline HTML page.

So a person can see where time goes in the model's own shape; the page zooms, pans, finds a node and shows its details.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..ir import Graph, Node
from ..units import format_bytes, format_us
from .inspect import Report, Row, format_shape


@dataclass(frozen=True, slots=True)
class GraphLayout:
    """Where the drawing puts each node (top-left corner and width, in px) and the edges between them, by index."""

    x_px: tuple[float, ...]
    y_px: tuple[float, ...]
    width_px: tuple[float, ...]
    edges: tuple[tuple[int, int], ...]
    total_width_px: float
    total_height_px: float


NODE_HEIGHT_PX = 34
LAYER_GAP_PX = 30
NODE_GAP_PX = 14
MARGIN_PX = 20
CHAR_WIDTH_PX = 7.3
"""Width of one character of the labels' 12 px monospace font."""
LABEL_CHARS = 36
"""Labels longer than this are cut with an ellipsis; the tooltip has the whole name."""
INFERNO_R = ("#fcffa4", "#f8cf3a", "#fb9706", "#eb6429", "#ca404a", "#9d2964", "#6f196e", "#3e0966", "#10092d")
"""matplotlib's inferno, reversed and stopped short of black: light is cheap, dark is costly."""
LOG_RANGE = 1e4
"""The colour scale is logarithmic over at most this ratio below the costliest node's time."""
FUSED_COLOUR = "#0e9f8e"
FONT = "DejaVu Sans Mono, Menlo, Consolas, monospace"


def layout_graph(graph: Graph) -> GraphLayout:
    """A layered drawing of the DAG: each node just above its first reader (an output below its latest input), so a
    value computed early for a late reader is drawn by that reader; in its layer, ordered by where its inputs sit, so
    a chain reads as a column and branches side by side."""
    index = {value.name: position for position, node in enumerate(graph.nodes) for value in node.outputs}
    parents = [sorted({index[name] for name in node.inputs if name in index}) for node in graph.nodes]
    children: list[list[int]] = [[] for _ in graph.nodes]
    for child, sources in enumerate(parents):
        for parent in sources:
            children[parent].append(child)
    layer = [0] * len(graph.nodes)
    for position, sources in enumerate(parents):
        layer[position] = 1 + max((layer[parent] for parent in sources), default=-1)
    for position in reversed(range(len(graph.nodes))):
        if children[position]:
            layer[position] = min(layer[child] for child in children[position]) - 1
    widths = [max(60.0, CHAR_WIDTH_PX * min(max(len(node.name), len(_op_label(node))), LABEL_CHARS) + 16)
              for node in graph.nodes]
    layers: list[list[int]] = [[] for _ in range(max(layer, default=-1) + 1)]
    for position, depth in enumerate(layer):
        layers[depth].append(position)
    centre = [0.0] * len(graph.nodes)
    for members in layers:
        wanted = {position: (sum(centre[parent] for parent in parents[position]) / len(parents[position])
                             if parents[position] else 0.0) for position in members}
        members.sort(key=lambda position: (wanted[position], position))
        right = -math.inf
        for position in members:
            centre[position] = max(wanted[position], right + NODE_GAP_PX + widths[position] / 2)
            right = centre[position] + widths[position] / 2
        shift = sum(wanted[position] - centre[position] for position in members) / max(len(members), 1)
        for position in members:
            centre[position] += shift
    left = min((centre[position] - widths[position] / 2 for position in range(len(widths))), default=0.0)
    x_px = tuple(centre[position] - widths[position] / 2 - left + MARGIN_PX for position in range(len(widths)))
    y_px = tuple(MARGIN_PX + depth * (NODE_HEIGHT_PX + LAYER_GAP_PX) for depth in layer)
    edges = tuple((parent, child) for child, sources in enumerate(parents) for parent in sources)
    total_width = max((x + width for x, width in zip(x_px, widths)), default=0.0) + MARGIN_PX
    total_height = 2 * MARGIN_PX + len(layers) * (NODE_HEIGHT_PX + LAYER_GAP_PX) - LAYER_GAP_PX
    return GraphLayout(x_px, y_px, tuple(widths), edges, total_width, max(total_height, 2 * MARGIN_PX))


def write_graph(report: Report, path: str | Path) -> Path:
    """The graph, every node labelled and coloured by predicted time: `.svg` (a `<title>` tooltip per node), or
    `.html`, one self-contained page that zooms (wheel), pans (drag), shows a node's details on hover, finds a node
    by name, and lists every node, costliest first."""
    target = Path(path)
    if target.suffix not in (".html", ".svg"):
        raise ValueError(f"graph output must be .html or .svg, not {target.suffix or 'no suffix'}")
    if report.graph is None:
        raise ValueError("this report carries no graph (reports read back from JSON do not)")
    layout = layout_graph(report.graph)
    scale = time_scale(report.rows)
    title = f"{report.model} on {report.device}"
    summary = (f"{report.totals['nodes']} nodes, predicted {format_us(report.totals['predicted_us'])} in all; "
               "hover a node for its details")
    if target.suffix == ".svg":
        legend_top = 48
        width = max(layout.total_width_px, 560)
        height = layout.total_height_px + legend_top + 40
        target.write_text(
            f"<?xml version='1.0' encoding='utf-8'?>\n<svg xmlns='http://www.w3.org/2000/svg' width='{width:.0f}' "
            f"height='{height:.0f}' viewBox='0 0 {width:.0f} {height:.0f}' font-family='{FONT}'>"
            f"<style>{SVG_STYLE}</style><rect width='100%' height='100%' fill='white'/>"
            f"<text x='{MARGIN_PX}' y='24' class='heading'>{html.escape(title)}</text>"
            f"<text x='{MARGIN_PX}' y='42' class='summary'>{html.escape(summary)}</text>"
            f"<g transform='translate({MARGIN_PX},52)'>{_legend_svg(scale)}</g>"
            f"<g transform='translate({(width - layout.total_width_px) / 2:.0f},{legend_top + 40})'>"
            f"{_scene_svg(report, layout, scale, titles=True)}</g></svg>\n"
        )
        return target
    data = {"width": layout.total_width_px, "height": layout.total_height_px,
            "nodes": [_node_data(report, row, layout) for row in report.rows]}
    listing = "".join(
        f"<tr data-i='{row.index}'><td>{row.index}</td><td>{html.escape(row.name)}</td><td>{html.escape(row.op)}</td>"
        f"<td>{row.bound}</td><td>{format_us(row.predicted_us)}</td><td>{row.share:.1%}</td></tr>"
        for row in report.costliest(len(report.rows))
    )
    target.write_text(
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}: ember graph</title>"
        f"<style>{PAGE_STYLE}{SVG_STYLE}</style></head><body>"
        f"<header><div><h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p></div>"
        f"<svg class='legend' width='340' height='44'>{_legend_svg(scale)}</svg>"
        "<div class='controls'><input id='ember-search' type='search' placeholder='find a node by name' "
        "aria-label='find a node by name'><button id='ember-fit' type='button'>fit</button>"
        "<span class='hint'>wheel: zoom · drag: pan</span></div></header>"
        f"<main id='ember-view'><svg id='ember-svg' font-family='{FONT}'><g id='ember-scene'>"
        f"{_scene_svg(report, layout, scale, titles=False)}</g></svg><div id='ember-tip' hidden></div></main>"
        f"<details><summary>every node, costliest first ({len(report.rows)})</summary><table>"
        f"<thead><tr><th>#</th><th>node</th><th>op</th><th>bound</th><th>predicted</th><th>share</th></tr></thead>"
        f"<tbody>{listing}</tbody></table></details>"
        f"<script type='application/json' id='ember-data'>{_json_for_script(data)}</script>"
        f"<script>{PAGE_SCRIPT}</script></body></html>\n"
    )
    return target


@dataclass(frozen=True, slots=True)
class TimeScale:
    """Predicted time to colour: logarithmic from `low_us` (and below: lightest) to `high_us` (darkest)."""

    low_us: float
    high_us: float


def time_scale(rows: tuple[Row, ...]) -> TimeScale:
    """The scale of `rows`: up to the costliest node's time, down to the cheapest nonzero one or LOG_RANGE below."""
    high = max((row.predicted_us for row in rows), default=0.0)
    low = min((row.predicted_us for row in rows if row.predicted_us > 0), default=high)
    return TimeScale(max(low, high / LOG_RANGE), high)


def _fraction(scale: TimeScale, time_us: float) -> float:
    """Where `time_us` sits on `scale`, from 0 to 1."""
    if scale.high_us <= scale.low_us:
        return 0.5 if time_us > 0 else 0.0
    if time_us <= scale.low_us:
        return 0.0
    return min(1.0, math.log(time_us / scale.low_us) / math.log(scale.high_us / scale.low_us))


def _time_at(scale: TimeScale, fraction: float) -> float:
    return scale.low_us * (scale.high_us / scale.low_us) ** fraction if scale.low_us > 0 else 0.0


def _colour(fraction: float) -> str:
    """INFERNO_R at `fraction` (0 to 1), linearly between its stops."""
    position = fraction * (len(INFERNO_R) - 1)
    below = min(int(position), len(INFERNO_R) - 2)
    weight = position - below
    low, high = (tuple(int(stop[i:i + 2], 16) for i in (1, 3, 5)) for stop in INFERNO_R[below:below + 2])
    return "#" + "".join(f"{round(a + (b - a) * weight):02x}" for a, b in zip(low, high))


def _ink(fill: str) -> str:
    """Black or white, whichever reads on `fill`."""
    red, green, blue = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#111" if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else "#fff"


def _scene_svg(report: Report, layout: GraphLayout, scale: TimeScale, *, titles: bool) -> str:
    """Edges, then one `<g class='node'>` per node: a box filled by predicted time, the name, the op."""
    parts = ["<defs><marker id='ember-arrow' viewBox='0 0 8 8' refX='8' refY='4' markerWidth='7' markerHeight='7' "
             "markerUnits='userSpaceOnUse' orient='auto'><path d='M0,0 L8,4 L0,8 z' fill='#9aa0a6'/></marker></defs><g class='edges'>"]
    for parent, child in layout.edges:
        x1 = layout.x_px[parent] + layout.width_px[parent] / 2
        y1 = layout.y_px[parent] + NODE_HEIGHT_PX
        x2 = layout.x_px[child] + layout.width_px[child] / 2
        y2 = layout.y_px[child]
        span = round((y2 - y1 + LAYER_GAP_PX) / (NODE_HEIGHT_PX + LAYER_GAP_PX))
        bend = 0.0 if span <= 1 else min(30 + 12 * span, 240) * (1 if (parent + child) % 2 else -1)
        reach = (y2 - y1) / 3 if span <= 1 else LAYER_GAP_PX
        parts.append(f"<path data-s='{parent}' data-t='{child}' d='M{x1:.1f},{y1:.1f} C{x1 + bend:.1f},{y1 + reach:.1f} "
                     f"{x2 + bend:.1f},{y2 - reach:.1f} {x2:.1f},{y2:.1f}'/>")
    parts.append("</g><g class='nodes'>")
    for row in report.rows:
        x, y, width = layout.x_px[row.index], layout.y_px[row.index], layout.width_px[row.index]
        fill = _colour(_fraction(scale, row.predicted_us))
        group = report.fusion_groups.get(row.name)
        op = _op_label(report.graph.nodes[row.index])
        title = f"<title>{html.escape(_describe(report, row))}</title>" if titles else ""
        parts.append(
            f"<g class='node{' fused' if group else ''}' data-i='{row.index}' transform='translate({x:.1f},{y:.1f})'>"
            f"{title}<rect width='{width:.1f}' height='{NODE_HEIGHT_PX}' rx='5' fill='{fill}'/>"
            f"<text x='{width / 2:.1f}' y='14' class='name' fill='{_ink(fill)}'>{html.escape(_cut(row.name))}</text>"
            f"<text x='{width / 2:.1f}' y='27' class='op' fill='{_ink(fill)}'>{html.escape(_cut(op))}</text></g>"
        )
    parts.append("</g>")
    return "".join(parts)


def _legend_svg(scale: TimeScale) -> str:
    """A colour bar of predicted time with five ticks, and the fused-group outline."""
    stops = "".join(f"<stop offset='{i / (len(INFERNO_R) - 1):.3f}' stop-color='{colour}'/>"
                    for i, colour in enumerate(INFERNO_R))
    ticks = "".join(
        f"<text x='{200 * fraction:.0f}' y='40' class='tick' text-anchor='{anchor}'>"
        f"{html.escape(format_us(_time_at(scale, fraction)))}</text>"
        for fraction, anchor in ((0, "start"), (0.5, "middle"), (1, "end"))
    )
    return (f"<defs><linearGradient id='ember-time'>{stops}</linearGradient></defs>"
            f"<text x='0' y='10' class='tick'>predicted time (log scale)</text>"
            f"<rect y='14' width='200' height='12' fill='url(#ember-time)' stroke='#888' stroke-width='0.5'/>{ticks}"
            f"<rect x='222' y='14' width='24' height='12' rx='3' fill='#fff' stroke='{FUSED_COLOUR}' stroke-width='2.5'/>"
            f"<text x='252' y='24' class='tick'>fused group</text>")


def _op_label(node: Node) -> str:
    """The second line of a node's box: its op (an extern's ATen target) and first output's shape."""
    op = node.target if node.is_extern else node.op
    return f"{op} {format_shape(node.outputs[0].type.shape)}"


def _cut(text: str) -> str:
    return text if len(text) <= LABEL_CHARS else text[:LABEL_CHARS - 1] + "…"


def _describe(report: Report, row: Row) -> str:
    """A node in plain lines: the tooltip of the SVG."""
    return "\n".join(f"{key}: {value}" for key, value in _details(report, row))


def _details(report: Report, row: Row) -> list[tuple[str, str]]:
    details = [
        ("node", row.name), ("op", f"{row.op} [extern]" if row.extern else row.op), ("kind", row.kind),
        ("output", ", ".join(format_shape(shape) for shape in row.output_shapes) + f" {row.dtype}"),
        ("inputs", ", ".join(format_shape(shape) for shape in row.input_shapes) or "none"),
        ("predicted", f"{format_us(row.predicted_us)} ({row.share:.1%} of the model, {row.bound}-bound)"),
        ("work", f"{row.flops / 1e9:,.3f} GFLOP, {format_bytes(row.bytes)} moved"),
        ("fusion group", report.fusion_groups.get(row.name, "none")),
    ]
    return details + ([("source", row.source)] if row.source else [])


def _node_data(report: Report, row: Row, layout: GraphLayout) -> dict[str, Any]:
    return {"name": row.name, "x": layout.x_px[row.index], "y": layout.y_px[row.index], "w": layout.width_px[row.index],
            "details": _details(report, row)}


def _json_for_script(data: Any) -> str:
    """JSON that cannot end its `<script>` element early."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


SVG_STYLE = f"""
.edges path {{ fill: none; stroke: #9aa0a6; stroke-width: 1.2; marker-end: url(#ember-arrow); }}
.node rect {{ stroke: #555; stroke-width: 1; }}
.node.fused rect {{ stroke: {FUSED_COLOUR}; stroke-width: 2.5; }}
.node text {{ text-anchor: middle; pointer-events: none; }}
.node .name {{ font-size: 12px; font-weight: bold; }}
.node .op {{ font-size: 10px; opacity: 0.85; }}
.heading {{ font-size: 16px; font-weight: bold; }}
.summary, .tick {{ font-size: 11px; fill: #333; }}
"""

PAGE_STYLE = """
html, body { margin: 0; height: 100%; font-family: system-ui, sans-serif; color: #222; }
body { display: flex; flex-direction: column; }
header { display: flex; flex-wrap: wrap; align-items: center; gap: 8px 24px; padding: 8px 16px;
         border-bottom: 1px solid #ddd; background: #fafafa; }
h1 { font-size: 17px; margin: 0; }
header p { margin: 2px 0 0; font-size: 12px; color: #555; }
.legend { overflow: visible; }
.controls { display: flex; gap: 8px; align-items: center; font-size: 12px; }
.controls input { width: 200px; padding: 3px 6px; }
.hint { color: #777; }
main { position: relative; flex: 1; min-height: 300px; overflow: hidden; background: #fff; }
#ember-svg { width: 100%; height: 100%; display: block; cursor: grab; user-select: none; touch-action: none; }
#ember-svg.dragging { cursor: grabbing; }
#ember-svg.far text { display: none; }
.node { cursor: pointer; }
.node.hover rect, .node.found rect { stroke: #1a73e8; stroke-width: 3; }
.edges path.hover { stroke: #1a73e8; stroke-width: 2.5; }
#ember-tip { position: absolute; pointer-events: none; background: rgba(255,255,255,0.97); border: 1px solid #bbb;
             border-radius: 4px; box-shadow: 0 2px 8px rgba(0,0,0,0.2); padding: 6px 8px; font-size: 12px;
             max-width: 460px; }
#ember-tip table { border-collapse: collapse; }
#ember-tip th { text-align: right; color: #666; font-weight: normal; padding: 1px 8px 1px 0; vertical-align: top;
               white-space: nowrap; }
#ember-tip td { font-family: DejaVu Sans Mono, Menlo, monospace; word-break: break-all; }
details { max-height: 35vh; overflow: auto; border-top: 1px solid #ddd; font-size: 12px; }
summary { padding: 6px 16px; cursor: pointer; }
details table { border-collapse: collapse; margin: 0 16px 12px; }
details td, details th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
details tbody tr { cursor: pointer; }
details tbody tr:hover { background: #eef4fd; }
"""

PAGE_SCRIPT = """
(() => {
  const data = JSON.parse(document.getElementById('ember-data').textContent);
  const svg = document.getElementById('ember-svg');
  const scene = document.getElementById('ember-scene');
  const tip = document.getElementById('ember-tip');
  const view = document.getElementById('ember-view');
  const boxes = Array.from(scene.querySelectorAll('g.node'));
  const edgesOf = boxes.map(() => []);
  for (const path of scene.querySelectorAll('.edges path')) {
    edgesOf[+path.dataset.s].push(path);
    edgesOf[+path.dataset.t].push(path);
  }
  const at = {x: 0, y: 0, k: 1};
  const apply = () => {
    scene.setAttribute('transform', `translate(${at.x},${at.y}) scale(${at.k})`);
    svg.classList.toggle('far', at.k < 0.35);
  };
  const fit = (whole) => {
    const r = svg.getBoundingClientRect();
    const kw = (r.width - 20) / data.width, kh = (r.height - 20) / data.height;
    at.k = Math.min(whole ? Math.min(kw, kh) : kw, 1.25);
    at.x = (r.width - data.width * at.k) / 2;
    at.y = whole ? (r.height - data.height * at.k) / 2 : 10;
    apply();
  };
  const zoom = (factor, px, py) => {
    const k = Math.min(8, Math.max(0.005, at.k * factor));
    at.x = px - (px - at.x) * k / at.k;
    at.y = py - (py - at.y) * k / at.k;
    at.k = k;
    apply();
  };
  svg.addEventListener('wheel', (event) => {
    event.preventDefault();
    const r = svg.getBoundingClientRect();
    zoom(Math.exp(-event.deltaY * 0.0015), event.clientX - r.left, event.clientY - r.top);
  }, {passive: false});
  let drag = null;
  svg.addEventListener('pointerdown', (event) => {
    if (event.button !== 0) return;
    drag = {x: event.clientX - at.x, y: event.clientY - at.y};
    svg.classList.add('dragging');
  });
  window.addEventListener('pointermove', (event) => {
    if (!drag) return;
    at.x = event.clientX - drag.x;
    at.y = event.clientY - drag.y;
    apply();
  });
  window.addEventListener('pointerup', () => { drag = null; svg.classList.remove('dragging'); });
  const mark = (i, on) => {
    boxes[i].classList.toggle('hover', on);
    for (const path of edgesOf[i]) path.classList.toggle('hover', on);
  };
  const place = (event) => {
    const r = view.getBoundingClientRect();
    let x = event.clientX - r.left + 16, y = event.clientY - r.top + 16;
    if (x + tip.offsetWidth > r.width) x = Math.max(0, x - tip.offsetWidth - 32);
    if (y + tip.offsetHeight > r.height) y = Math.max(0, y - tip.offsetHeight - 32);
    tip.style.left = `${x}px`;
    tip.style.top = `${y}px`;
  };
  const show = (i, event) => {
    const table = document.createElement('table');
    for (const [key, value] of data.nodes[i].details) {
      const row = table.insertRow();
      const head = document.createElement('th');
      head.textContent = key;
      row.appendChild(head);
      row.insertCell().textContent = value;
    }
    tip.replaceChildren(table);
    tip.hidden = false;
    place(event);
  };
  let hovered = -1;
  scene.addEventListener('pointerover', (event) => {
    const box = event.target.closest('g.node');
    if (!box || drag) return;
    if (hovered >= 0) mark(hovered, false);
    hovered = +box.dataset.i;
    mark(hovered, true);
    show(hovered, event);
  });
  scene.addEventListener('pointermove', (event) => { if (!tip.hidden) place(event); });
  scene.addEventListener('pointerout', (event) => {
    const box = event.target.closest('g.node');
    if (!box || box.contains(event.relatedTarget)) return;
    mark(+box.dataset.i, false);
    hovered = -1;
    tip.hidden = true;
  });
  let found = -1;
  const focus = (i) => {
    const r = svg.getBoundingClientRect(), node = data.nodes[i];
    at.k = Math.max(at.k, 1);
    at.x = r.width / 2 - (node.x + node.w / 2) * at.k;
    at.y = r.height / 2 - (node.y + 17) * at.k;
    apply();
    if (found >= 0) boxes[found].classList.remove('found');
    found = i;
    boxes[i].classList.add('found');
  };
  const search = document.getElementById('ember-search');
  search.addEventListener('keydown', (event) => {
    if (event.key !== 'Enter' || !search.value) return;
    const text = search.value.toLowerCase();
    const hits = data.nodes.map((node, i) => node.name.toLowerCase().includes(text) ? i : -1).filter((i) => i >= 0);
    if (hits.length) focus(hits.find((i) => i > found) ?? hits[0]);
  });
  document.getElementById('ember-fit').addEventListener('click', () => fit(true));
  for (const row of document.querySelectorAll('details tbody tr')) {
    row.addEventListener('click', () => focus(+row.dataset.i));
  }
  const r = svg.getBoundingClientRect();
  if (Math.min((r.width - 20) / data.width, (r.height - 20) / data.height) >= 0.5 || !data.nodes.length) {
    fit(true);
  } else {
    const first = data.nodes[0];
    at.k = Math.max(Math.min((r.width - 20) / data.width, 1.25), 0.6);
    at.x = r.width / 2 - (first.x + first.w / 2) * at.k;
    at.y = 0;
    apply();
  }
  document.documentElement.dataset.emberReady = String(boxes.length);
  if (location.hash === '#selftest') {
    const before = scene.getAttribute('transform');
    svg.dispatchEvent(new WheelEvent('wheel', {bubbles: true, cancelable: true, deltaY: -300, clientX: 100, clientY: 100}));
    const zoomed = scene.getAttribute('transform') !== before;
    const costliest = +document.querySelector('details tbody tr').dataset.i;
    focus(costliest);
    const box = boxes[costliest].querySelector('rect'), spot = box.getBoundingClientRect();
    box.dispatchEvent(new PointerEvent('pointerover', {bubbles: true, clientX: spot.right - 20, clientY: spot.bottom - 10}));
    const result = document.createElement('pre');
    result.id = 'ember-selftest';
    result.hidden = true;
    result.textContent = JSON.stringify({
      tooltip: tip.hidden ? '' : tip.textContent, zoomed, focused: found,
      hovering: boxes.filter((b) => b.classList.contains('hover')).length,
      lit: scene.querySelectorAll('.edges path.hover').length,
    });
    document.body.appendChild(result);
  }
})();
"""
