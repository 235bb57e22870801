"""Pictures (DOT, pure SVG, HTML, Graphviz, a real headless browser) and graph diffs."""

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import morphc
from morphc import zoo
from morphc.ir.tags import Role, tag
from morphc.tools import pictures as viz
from morphc.tools import svg_layout
from morphc.tools.graph_diff import diff_graphs, diff_models, measure_deviation

EVIL = 'x"];\n evil -> pwned [label="<script>alert(1)</script>\\'
DOT_NODE = re.compile(r"^\s*(\w+) \[label=", re.M)
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def extended():
    model, inputs = zoo.cnn_bn()
    return morphc.extend(model, inputs, sites="all", width=2)


def hand_graph(target: str = "relu") -> fx.Graph:
    """x → relu → branch (role extension) → add (role extension_add) → output, with shapes."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(2, 3)
    y = graph.call_function(torch.relu, (x,))
    y.meta.update(tensor_meta=torch.empty(2, 3))
    tag(y, Role.SITE, "s")
    y.name = target if target.isidentifier() else y.name
    branch = graph.call_module("morphc_ext.s", (x,))
    branch.meta.update(val=torch.empty(2, 3))
    tag(branch, Role.EXTENSION, "s")
    add = graph.call_function(torch.add, (y, branch))
    add.meta.update(val=torch.empty(2, 3))
    tag(add, Role.EXTENSION_ADD, "s")
    graph.output(add)
    return graph


def svg_nodes(svg: str) -> dict[str, list[str]]:
    """kind → data-name of every ``<g class="node KIND">`` in an SVG document."""
    root = ET.fromstring(svg)
    found: dict[str, list[str]] = {}
    for g in root.iter("{http://www.w3.org/2000/svg}g"):
        classes = g.get("class", "").split()
        if classes[:1] == ["node"]:
            found.setdefault(classes[1], []).append(g.get("data-name"))
    return found


# --- DOT ---------------------------------------------------------------------------------------

def test_dot_has_every_node_and_highlights_extension_nodes(extended):
    gm = extended.graph_module
    dot = viz.to_dot(gm, title="extended")
    nodes = list(gm.graph.nodes)
    assert len(DOT_NODE.findall(dot)) == len(nodes)
    fill = viz.STYLES["extension"][0]
    ext_lines = [line for line in dot.splitlines() if f'fillcolor="{fill}"' in line]
    assert len(ext_lines) == 3, "one branch call per site (conv1, conv2, head)"
    assert all("morphc_ext" in line for line in ext_lines)
    assert dot.count('class="site"') == 3 and dot.count('class="extension_add"') == 3
    assert "4×8×12×12" in dot, "shapes come from tensor_meta"
    edges = sum(len(n.all_input_nodes) for n in nodes)
    assert dot.count(" -> ") == edges


def test_dot_of_a_hand_built_graph_marks_roles_and_shapes():
    dot = viz.to_dot(hand_graph())
    assert len(DOT_NODE.findall(dot)) == 5
    by_class = {kind: dot.count(f'class="{kind}"') for kind in viz.STYLES}
    assert by_class == {"extension": 1, "extension_add": 1, "site": 1, "placeholder": 1,
                        "output": 1, "get_attr": 0, "op": 0}
    assert "2×3" in dot and "morphc_ext.s" in dot


def test_dot_labels_are_escaped_against_injection():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module(EVIL, (x,)))
    for dot in (viz.to_dot(graph, title=EVIL),
                viz.side_by_side_dot(graph, graph, labels=(EVIL, "b"), title=EVIL)):
        outside_strings = QUOTED.sub('""', dot)
        assert "evil" not in outside_strings and "pwned" not in outside_strings
        assert "\n evil" not in dot, "raw newlines in labels are escaped as \\n"


def test_side_by_side_dot_has_two_clusters(extended):
    dot = viz.side_by_side_dot(extended.traced.graph_module, extended.graph_module)
    assert "subgraph cluster_0" in dot and "subgraph cluster_1" in dot
    assert '"original"' in dot and '"extended"' in dot
    total = len(extended.traced.graph_module.graph.nodes) + len(extended.graph_module.graph.nodes)
    assert len(DOT_NODE.findall(dot)) == total


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")
def test_render_svg_and_png_with_graphviz(extended, tmp_path):
    dot = viz.side_by_side_dot(extended.traced.graph_module, extended.graph_module)
    svg = viz.render(dot, tmp_path / "g.svg").read_text()
    root = ET.fromstring(svg)
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert sum(bool(re.fullmatch(r"g[01]_n\d+", t or "")) for t in titles) == \
        len(DOT_NODE.findall(dot))
    assert viz.STYLES["extension"][0] in svg
    png = viz.render(dot, tmp_path / "g.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    evil = viz.render(viz.to_dot(hand_graph(), title=EVIL), tmp_path / "evil.svg").read_text()
    assert "<script" not in evil, "Graphviz got the title as text, escaped"


def test_render_without_graphviz_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(viz.VizError, match="apt-get install graphviz.*brew install graphviz"):
        viz.render(viz.to_dot(hand_graph()), tmp_path / "g.png")
    assert viz.render("digraph { a }", tmp_path / "g.dot").read_text() == "digraph { a }"
    with pytest.raises(viz.VizError, match=r"\.svg, \.png"):
        viz.render("digraph { a }", tmp_path / "g.jpeg")


# --- pure SVG ----------------------------------------------------------------------------------

def test_pure_svg_parses_and_highlights_extension_nodes(extended):
    svg = viz.to_svg(extended.graph_module, title="extended <graph>")
    nodes = svg_nodes(svg)
    assert sum(map(len, nodes.values())) == len(extended.graph_module.graph.nodes)
    assert sorted(nodes["extension"]) == ["morphc_ext_conv1", "morphc_ext_conv2",
                                          "morphc_ext_head"]
    assert len(nodes["extension_add"]) == 3 and sorted(nodes["site"]) == ["conv1", "conv2",
                                                                          "head"]
    assert "extended &lt;graph&gt;" in svg


def test_pure_svg_layout_is_layered_top_down(extended):
    boxes, width, height = svg_layout._layout(extended.graph_module)
    at = {b.node.name: b for b in boxes}
    for box in boxes:
        for src in box.node.all_input_nodes:
            assert at[src.name].y + at[src.name].h < box.y, "inputs sit above their users"
        assert 0 <= box.x and box.x + box.w <= width and box.y + box.h <= height


def test_pure_svg_escapes_markup():
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("<script>alert(1)</script>&", (x,)))
    svg = viz.to_svg(graph, title=EVIL)
    root = ET.fromstring(svg)   # would fail on unescaped markup
    assert not [e for e in root.iter() if e.tag.endswith("script")]
    side = viz.side_by_side_svg(graph, hand_graph(), labels=("a<", "b&"))
    assert len(ET.fromstring(side).findall("{http://www.w3.org/2000/svg}g")) == 2


# --- HTML --------------------------------------------------------------------------------------

class StrictHTML(HTMLParser):
    """Collects tags and attributes; fails on unbalanced non-void elements."""

    VOID = {"meta", "br", "img", "link", "input", "hr", "path", "rect", "stop"}

    def __init__(self):
        super().__init__()
        self.stack, self.starts, self.urls = [], [], []

    def handle_starttag(self, tag, attrs):
        self.starts.append((tag, dict(attrs)))
        self.urls += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.starts.append((tag, dict(attrs)))
        self.urls += [v for k, v in attrs if k in ("src", "href", "xlink:href") and v]

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def parse_html(text: str) -> StrictHTML:
    parser = StrictHTML()
    parser.feed(text)
    parser.close()
    assert parser.stack == [], f"unclosed: {parser.stack}"
    return parser


def test_html_is_self_contained_and_shows_both_graphs(extended):
    report = morphc.inspect(extended)
    page = viz.to_html(extended.traced.graph_module, extended.graph_module,
                       title="cnn <&> bn", report_text="</pre><script>alert(1)</script>",
                       reports=[report])
    parsed = parse_html(page)
    assert not [u for u in parsed.urls if re.match(r"\s*(https?:)?//", u)], parsed.urls
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert "&lt;/pre&gt;&lt;script&gt;" in page and "cnn &lt;&amp;&gt; bn" in page
    tags = [t for t, _ in parsed.starts]
    assert tags.count("svg") == 2 and "table" in tags and 'class="legend"' in page
    ext_nodes = [a["data-name"] for t, a in parsed.starts
                 if t == "g" and a.get("class") == "node extension"]
    assert sorted(ext_nodes) == ["morphc_ext_conv1", "morphc_ext_conv2", "morphc_ext_head"]
    ids = [a["id"] for _, a in parsed.starts if "id" in a]
    assert len(ids) == len(set(ids)), "element ids stay unique with two inline SVGs"


def test_write_html_single_graph(tmp_path):
    path = viz.write_html(tmp_path / "one.html", hand_graph(), title="one")
    parsed = parse_html(path.read_text(encoding="utf-8"))
    assert [t for t, _ in parsed.starts].count("svg") == 1


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed")
def test_html_in_a_headless_browser(extended, tmp_path):
    page = viz.write_html(tmp_path / "graph.html", extended.traced.graph_module,
                          extended.graph_module, title="browser check")
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert dom.count("<svg") == 2
    for name in ("morphc_ext_conv1", "morphc_ext_head", "conv2"):
        assert f'data-name="{name}"' in dom
    assert dom.count('class="node extension"') == 3
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,800", page.as_uri()],
                   capture_output=True, timeout=60, check=True)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


# --- graph diff --------------------------------------------------------------------------------

def test_extend_adds_two_nodes_per_site_use_and_contract_removes_them():
    model, inputs = zoo.tied()
    ext = morphc.extend(model, inputs, sites="all", width=3)
    uses = sum(len(site.uses) for site in ext.sites)
    assert any(site.tied for site in ext.sites), "the tied model has a multi-use site"
    diff = diff_models(model, ext, inputs)
    assert diff.graph.added_by_role() == {"extension": uses, "extension_add": uses}
    assert not diff.graph.removed and not diff.graph.renamed
    assert diff.deviation == 0.0, "E1: extension changes nothing"
    assert f"+{2 * uses} added" in str(diff.graph)
    assert diff.to_dict()["graph"]["nodes_b"] == diff.graph.nodes_a + 2 * uses

    with torch.no_grad():   # move B away from 0, so the fold has something to fold
        for param in ext.extension_parameters():
            param.add_(0.3 * torch.randn_like(param))
    ext.set_homotopy(0.0)
    probe = (torch.randn(11, *inputs[0].shape[1:]),)
    before = ext(*probe)
    assert measure_deviation(model, ext, probe) > 1e-3, "the perturbed branches matter"
    contracted = morphc.contract(ext)
    back = diff_models(ext, contracted, probe, reference_outputs=before)
    assert back.graph.added == [] and len(back.graph.removed) == 2 * uses
    assert {n.role for n in back.graph.removed} == {"extension", "extension_add"}
    assert back.deviation <= 1e-6
    assert diff_graphs(ext.traced.graph_module, ext.contracted_graph_module).identical
    recorded = diff_models(ext, contracted, probe)
    assert recorded.deviation == ext.contraction_report.deviation and "contract" in recorded.note


def test_diff_matches_renamed_nodes_and_reports_changes():
    a, b = hand_graph(), hand_graph()
    relu = next(n for n in b.nodes if n.target is torch.relu)
    relu.name = "renamed_relu"
    out = next(n for n in b.nodes if n.op == "output")
    with b.inserting_before(out):
        extra = b.call_function(torch.neg, (out.args[0],))
    out.args = (extra,)
    diff = diff_graphs(a, b)
    assert diff.renamed == [("relu", "renamed_relu")]
    assert [n.target for n in diff.added] == ["torch.neg"] and diff.removed == []
    assert diff_graphs(a, hand_graph()).identical
    with pytest.raises(TypeError, match="diff_models"):
        diff_graphs(nn.Linear(2, 2), a)


def test_measure_deviation_is_seeded_and_leaves_batchnorm_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    stats = model[1].running_mean.clone()
    x = torch.randn(8, 4)
    assert measure_deviation(model, model, (x,)) == 0.0, "same seed: same dropout mask"
    assert torch.equal(model[1].running_mean, stats)
    other = nn.Sequential(nn.Linear(4, 4))
    assert measure_deviation(model.eval(), other, x) > 0


class TwoHeads(nn.Module):
    """Nested outputs: a dict holding a tuple, so every leaf must be compared."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.fc, self.scale = nn.Linear(3, 2), scale

    def forward(self, x):
        y = self.fc(x)
        return {"logits": y, "extra": (y * self.scale, x.sum(1))}


def test_measure_deviation_compares_every_leaf_of_tuple_and_dict_outputs():
    torch.manual_seed(0)
    a = TwoHeads()
    b = TwoHeads(scale=1.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3)
    same = TwoHeads()
    same.load_state_dict(a.state_dict())
    assert measure_deviation(a, same, x) == 0.0
    y = a.fc(x).detach()
    assert measure_deviation(a, b, (x,)) == pytest.approx(
        float((0.5 * y).abs().max() / y.abs().max()), rel=1e-6), "only the scaled leaf differs"
