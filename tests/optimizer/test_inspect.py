"""ember.inspect: rows for every node, totals that add up, memory, and the JSON, plot and graph outputs."""
from __future__ import annotations

import json
import re
from xml.etree import ElementTree

import pytest
import torch
from matplotlib.text import Text

import ember
from ember import models
from ember.optimizer.cost import CostModel, load_profile
from ember.optimizer.graph_view import layout_graph, write_graph
from ember.optimizer.pipeline import capture_by_cost
from ember.optimizer.plots import plot_roofline
from ember.units import format_bytes

SVG = {"svg": "http://www.w3.org/2000/svg"}


@pytest.fixture(scope="module")
def report():
    model, inputs = models.load("gpt2", "suite", device="meta")
    return ember.inspect(model, inputs, device="h100")


def test_rows_cover_every_node_and_totals_add_up(report):
    assert len(report.rows) == report.totals["nodes"] == len(report.graph.nodes)
    assert report.totals["flops"] == sum(row.flops for row in report.rows)
    assert report.totals["predicted_us"] == pytest.approx(sum(row.predicted_us for row in report.rows))
    assert sum(row.share for row in report.rows) == pytest.approx(1.0)
    assert sum(entry["nodes"] for entry in report.by_kind.values()) == len(report.rows)


def test_the_costliest_are_sorted_and_led_by_the_lm_head(report):
    costliest = report.costliest()
    assert len(costliest) == 10
    assert [row.predicted_us for row in costliest] == sorted((row.predicted_us for row in costliest), reverse=True)
    head = costliest[0]
    assert head.op == "linear" and head.output_shapes == ((8, 512, 50257),)
    assert head.flops == 2 * 8 * 512 * 768 * 50257 and head.bound == "compute"


def test_gpt2_small_flops_match_the_hand_count(report):
    """Per layer: QKV, attention out, two MLP matmuls (24·h² per token) and attention (4·s·h per token)."""
    tokens, hidden, layers, vocab, seq = 8 * 512, 768, 12, 50257, 512
    matmul = 2 * tokens * (12 * hidden * hidden) * layers + 2 * tokens * hidden * vocab
    attention = 4 * tokens * seq * hidden * layers
    kinds = report.by_kind
    assert kinds["attention"]["flops"] == attention
    biases = tokens * (3 * hidden + hidden + 4 * hidden + hidden) * layers
    assert kinds["matmul"]["flops"] == matmul + biases


def test_memory_reports_weights_and_the_eager_order_peak(report):
    memory = report.memory
    # GPT-2 small in bf16, the tied LM head counted once, and its 512 position ids (int64), folded at compile time
    assert memory["weights_bytes"] == 2 * 124_439_808 + 512 * 8
    logits = 8 * 512 * 50257 * 2
    assert memory["peak_live_bytes"] >= logits and memory["peak_step"] == len(report.rows) - 1
    assert memory["no_reuse_bytes"] > memory["peak_live_bytes"]
    assert memory["lower_bound_bytes"] <= memory["planned_bytes"] <= memory["greedy_bytes"] < memory["no_reuse_bytes"]
    assert memory["planned_bytes"] <= 1.02 * memory["lower_bound_bytes"] and memory["plan_status"] in ("optimal", "feasible")


def test_json_has_rows_and_totals_with_the_documented_keys(report):
    data = json.loads(report.to_json())
    assert {"op", "flops", "bytes", "predicted_us", "bound"} <= set(data["rows"][0])
    assert {"flops", "bytes", "predicted_us"} <= set(data["totals"])
    assert "graph" not in data and len(data["costliest"]) == 10


def test_roofline_and_graph_files_are_written(report, tmp_path):
    png = plot_roofline(report, load_profile("h100"), tmp_path / "roofline.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = write_graph(report, tmp_path / "graph.html").read_text()
    assert "<svg" in page and "linear" in page and "GPT2LMHeadModel" in page
    svg = write_graph(report, tmp_path / "graph.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    ElementTree.fromstring(svg.split("?>", 1)[1])
    with pytest.raises(ValueError, match=".html or .svg"):
        write_graph(report, tmp_path / "graph.dot")


def test_the_costliest_roofline_points_are_named(report, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    plot_roofline(report, load_profile("h100"), tmp_path / "roofline.png")
    labels = [text.get_text() for text in closed[0].axes[0].texts]
    assert len(labels) == 10 and "linear" in labels  # the LM head: the costliest, alone at its point
    assert "scaled_dot_product_attention +11 alike" in labels  # one label for the twelve layers' attention
    boxes = [Text.get_window_extent(text) for text in closed[0].axes[0].texts]  # the words, not the arrow
    overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert not overlaps
    plt.close("all")


def test_every_node_is_labelled_in_the_svg_with_a_title(report, tmp_path):
    root = ElementTree.fromstring(write_graph(report, tmp_path / "graph.svg").read_text().split("?>", 1)[1])
    nodes = root.findall(".//svg:g[@data-i]", SVG)
    assert len(nodes) == len(report.rows)
    for node, row in zip(nodes, report.rows):
        assert node.find("svg:text[@class='name']", SVG).text == row.name
        title = node.find("svg:title", SVG).text
        assert f"node: {row.name}\nop: {row.op}" in title and "predicted: " in title and "fusion group: " in title
    fused = [node for node in nodes if "fused" in node.get("class").split()]
    assert len(fused) == len(report.fusion_groups) == report.fusion["fused_nodes"]


def test_the_layout_is_layered_downwards_without_overlaps(report):
    layout = layout_graph(report.graph)
    assert len(layout.x_px) == len(report.rows)
    assert all(layout.y_px[child] > layout.y_px[parent] for parent, child in layout.edges)
    by_layer = {}
    for index, y in enumerate(layout.y_px):
        by_layer.setdefault(y, []).append(index)
    for members in by_layer.values():
        spans = sorted((layout.x_px[i], layout.x_px[i] + layout.width_px[i]) for i in members)
        assert all(right <= next_left for (_, right), (next_left, _) in zip(spans, spans[1:]))
    assert min(layout.x_px) >= 0 and max(x + w for x, w in zip(layout.x_px, layout.width_px)) <= layout.total_width_px


def test_the_html_page_carries_every_node_and_needs_no_network(report, tmp_path):
    page = write_graph(report, tmp_path / "graph.html").read_text()
    data = json.loads(re.search(r"<script type='application/json' id='ember-data'>(.*?)</script>", page).group(1))
    assert [node["name"] for node in data["nodes"]] == [row.name for row in report.rows]
    head = dict(data["nodes"][report.costliest(1)[0].index]["details"])
    assert head["output"] == "[8,512,50257] bf16" and head["predicted"].startswith("3.") and "ms" in head["predicted"]
    assert not re.search(r"""(src|href)\s*=|@import|<link|https?://""", page)


def test_text_rendering_names_the_parts(report):
    text = str(report)
    for expected in ("GPT2LMHeadModel on h100", "time by op kind", "the 10 costliest nodes", "activations peak", "arena plan"):
        assert expected in text
    assert f"weights {format_bytes(report.memory['weights_bytes'])};" in text and "237.35 MiB" in text


def test_small_sizes_print_in_the_unit_that_fits():
    report = ember.inspect(torch.nn.Linear(5, 3), (torch.randn(2, 5),), device="h100")
    text = str(report)
    assert "0.00 MiB" not in text and "0.0 MiB" not in text
    assert format_bytes((5 * 3 + 3) * 4) == "72 B" and "weights 72 B;" in text


def test_inspect_accepts_a_profile_path_and_a_cpu_model(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(load_profile("a100").to_json())
    report = ember.inspect(torch.nn.Linear(64, 32), (torch.randn(9, 64),), device=str(path))
    assert report.device == "a100" and report.rows[0].flops == 2 * 9 * 64 * 32 + 9 * 32


def test_inspect_shows_the_plan_compile_builds():
    """The same fusion groups, the same arenas and the capture decision compile's cost model makes, on the same
    profile (compile off a GPU prices with the reference profile, h100)."""
    model, inputs = models.load("llama_b1")
    report = ember.inspect(model, inputs, device="h100")
    program = ember.compile(model, inputs, ember.Options(fusion=True))
    assert report.fusion["decisions"] and report.fusion["decisions"] == program.report.fusion["decisions"]

    def planned(summary):
        return {key: value for key, value in summary.items() if key != "plan_seconds"}

    assert planned(report.arena) == planned(program.report.memory)
    assert report.capture == capture_by_cost(program.graph, CostModel(load_profile("h100")))
    assert "arena plan as compile builds it" in str(report) and "CUDA graphs: " in str(report)
