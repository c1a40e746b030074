"""The pipeline report: structured facts of the passes, short terminal notes, standard JSON, and the
HTML page, checked as data and rendered in a real headless browser (skipped without one)."""
import base64
import dataclasses
import io
import json
import re
import shutil
import subprocess

import pytest
import torch

import graphopt
from graphopt.passes.report import PassRecord, Report
from graphopt.passes.report_html import first_block, render_html, write_html
from tests.tiny_models import TanhMLP

SECTIONS = ["pipeline", "table-accuracy-and-speed", "trade-offs", "cost", "check", "pass-1", "pass-2", "pass-3",
            "graph", "files"]


def _tiny_hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=32, patch_size=4, num_labels=10)
    return ViTForImageClassification(cfg).eval()


@pytest.fixture(scope="module")
def optimized():
    """A 2-block ViT (65 tokens) through token_merge r=4, a 50% SVD and integer_only."""
    pytest.importorskip("transformers")
    model = _tiny_hf_vit()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    calib = [(torch.randn(2, 3, 32, 32, generator=g),) for _ in range(2)]
    before = graphopt.optimize(model, [], (x,), progress=False).graph
    om = graphopt.optimize(before, ["token_merge:r=4", "low_rank:method=svd,ratio=0.5", "integer_only"], (x,),
                           calibration=calib, check=True, progress=False)
    return before, om


def test_token_counts_per_block_follow_the_schedule(optimized):
    _, om = optimized
    # 8x8 patches + CLS = 65 tokens enter block 0; r=4 merges 4 before block 1
    assert om.report["token_merge"].details["tokens_per_block"] == [65, 61]
    assert om.report["integer_only"].details["tokens_per_block"] == [65, 61]  # read off int.shiftmax


def test_low_rank_ranks_per_layer_match_the_factors(optimized):
    _, om = optimized
    record = om.report["low_rank"]
    layers = record.details["layers"]
    factorised = {name: d for name, d in layers.items() if d["rank"] is not None}
    assert len(factorised) == record.counters["factorised"]
    q = next(d for name, d in layers.items() if re.search(r"0\.attention\.(q_proj|query)$", name))
    # 50% of a 64x64 matrix's parameters: r * (64 + 64) = 2048 -> r = 16
    assert q["shape"] == [64, 64] and q["rank"] == 16 and q["kept_fraction"] == pytest.approx(0.5)


def test_integer_coverage_counts_every_converted_op(optimized):
    _, om = optimized
    record = om.report["integer_only"]
    coverage = record.details["integer_coverage"]
    assert sum(coverage["converted"].values()) == record.counters["converted"]
    assert coverage["left_in_float"] == [] and record.counters["float_fallback"] == 0
    assert coverage["converted"]["linear"] == record.ops_before["linear"]


def test_fallbacks_are_counted_by_op_and_reason():
    torch.manual_seed(0)
    calib = [(torch.randn(4, 8),) for _ in range(2)]
    om = graphopt.optimize(TanhMLP().eval(), ["integer_only"], calib[0], calibration=calib, progress=False)
    record = om.report["integer_only"]
    left = record.details["integer_coverage"]["left_in_float"]
    assert [(f["op"], f["reason"]) for f in left] == [("tanh", "no integer form of this op")]
    assert record.details["integer_coverage"]["converted"] == {"linear": 2}
    assert "tanh x1 (no integer form of this op)" in record.notes[0]


def test_terminal_table_is_short_and_verbose_is_complete():
    long_note = "left in float: " + ", ".join(f"%{i} (tanh)" for i in range(300))
    notes = ["short one", long_note] + [f"layer {i}: rank 4" for i in range(10)]
    report = Report([PassRecord("p", 10, 9, 0.01, None, notes, {"converted": 5})])
    short = str(report)
    assert "short one" in short and "converted=5" in short and "%299" not in short
    assert "+8 more notes" in short  # 1 long + 7 beyond the first four short ones
    verbose = report.format(verbose=True, width=400)
    assert "%299 (tanh)" in verbose and "layer 9: rank 4" in verbose


def test_json_is_standard_with_an_infinite_error():
    report = Report([PassRecord("token_merge", 10, 12, 0.01, float("inf"))])
    text = report.to_json()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["passes"][0]["max_abs_error"] is None


def _page(optimized, tmp_path):
    before, om = optimized
    report = dataclasses.replace(om.report, curves=[], tables={})  # the fixture's report stays as it was
    report.attach_table("Accuracy and speed", [{"variant": "float", "accuracy": 0.97},
                                               {"variant": "integer", "accuracy": 0.96}])
    report.attach_curve("token_merge: accuracy vs time", [(10.0, 0.97, "r=0"), (8.0, 0.96, "r=4")], "ms", "accuracy")
    path = tmp_path / "report.html"
    write_html(str(path), report, title="test report", check={"max_abs_error": 0.5, "cosine": 0.99},
               graph_before=before, graph_after=om.graph, files={"model": "out.onnx"})
    return path, path.read_text()


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_html_is_self_contained_with_every_section(optimized, tmp_path):
    import matplotlib.image

    _, om = optimized
    _, page = _page(optimized, tmp_path)
    for section in SECTIONS:
        assert f'<section id="{section}"' in page, section
    assert not re.search(r'(src|href)="(http|//)', page) and "<script" not in page
    # the curve + tokens per block (token_merge) + ranks (low_rank) + the block before and after
    images = _pngs(page)
    assert len(images) == 5
    for png in images:
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 0.01
    record = om.report["integer_only"]
    assert f"<td class=\"n\">{record.nodes_before}</td><td class=\"n\">{record.nodes_after}</td>" in page
    assert "Integer conversion coverage" in page and "Low-rank: rank per layer" in page


def test_html_of_a_sparsify_run_lists_each_layers_zeros(tmp_path):
    # the page once read every pass's per-layer details as low_rank's ranks: KeyError 'rank', and opt-cli --report
    # x.html then failed after sparsify and wrote nothing
    model = _tiny_hf_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    om = graphopt.optimize(model, ["sparsify:criterion=magnitude,sparsity=0.5,substitute=never"], (x,),
                           progress=False)
    layers = om.report["sparsify"].details["layers"]
    path = tmp_path / "sparse.html"
    write_html(str(path), om.report)
    page = path.read_text()
    assert "Sparsity per layer" in page and len(_pngs(page)) == 1
    for name, d in layers.items():
        assert f"<td>{name}</td>" in page and f"{100 * d['sparsity']:.1f}%" in page
    assert all(abs(d["sparsity"] - 0.5) < 0.01 for d in layers.values())   # magnitude pruning's 50 % per layer


def test_first_block_drawing_covers_the_block(optimized):
    before, om = optimized
    prefix, nodes = first_block(before)
    assert prefix.endswith(".0")
    assert {"linear", "sdpa"} <= {n.op for n in nodes}
    _, after = first_block(om.graph)
    assert "int.linear" in {n.op for n in after}


def _browser():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# a probe added to a copy of the page: records what the browser made of it into the DOM
_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const out = document.createElement('pre'); out.id = 'probe';
  const imgs = [...document.images].map(i => i.complete && i.naturalWidth > 0 ? i.naturalWidth : 0);
  const ids = [...document.querySelectorAll('section')].map(s => s.id);
  const tables = document.querySelectorAll('table').length;
  out.textContent = JSON.stringify({imgs, ids, tables, errors: window.__errors, title: document.title});
  document.body.appendChild(out);
});
</script>"""


def _chromium(browser, tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars"]
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_a_headless_browser(optimized, tmp_path):
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium installed (apt-get install chromium) to render the report")
    path, page = _page(optimized, tmp_path)
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", _PROBE + "</body>"))
    dom = _chromium(browser, tmp_path, "--virtual-time-budget=5000", "--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"the browser did not run the page: {dom.stderr[-2000:]}"
    probe = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert probe["errors"] == [] and probe["title"] == "test report"
    assert probe["ids"] == SECTIONS
    assert len(probe["imgs"]) == len(_pngs(page)) and all(w > 100 for w in probe["imgs"]), probe["imgs"]
    assert probe["tables"] >= 10

    shot = tmp_path / "report.png"
    _chromium(browser, tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", path.as_uri())
    import matplotlib.image
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (2400, 1200)
    # not a blank page: dark text on white, and the plots' blue
    assert (pixels[..., :3].mean(-1) < 0.3).mean() > 0.002
    assert ((pixels[..., 2] > 0.5) & (pixels[..., 0] < 0.45)).mean() > 0.001
