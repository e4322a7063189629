"""dump(): every format parses and names every quantized layer; stage dumps come in order."""
from __future__ import annotations

import json
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest
import torch

import ptqat_fx
from ptqat_fx import InputError, QuantConfig
from ptqat_fx.views.dump import drawing
from ptqat_fx.views.dump.drawing import heat
from ptqat_fx.views.dump.graph_record import SCHEMA
from ptqat_fx.views.dump.stages import stage_names
from ptqat_fx.views.dump.svg import layout_svg, render_svg
from ptqat_fx.layer_spec import layer_nodes, layer_specs
from ptqat_fx.runtime.quantizer import quantizers
from examples import resnet_small, vit_small

EXAMPLES = {"resnet": (resnet_small.build, (4, 3, 32, 32)), "vit": (vit_small.build, (4, 1, 28, 28))}
FAST = QuantConfig(w_observer="minmax", a_observer="minmax")


def _quantized(name: str, **kwargs) -> torch.fx.GraphModule:
    build, shape = EXAMPLES[name]
    data = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return ptqat_fx.quantize(build(), (data[0],), data, FAST, progress=False, **kwargs)


@pytest.fixture(scope="module", params=list(EXAMPLES))
def qmodel(request):
    return _quantized(request.param)


def _svg_text(svg: str) -> str:
    root = ElementTree.fromstring(svg)
    return " ".join(" ".join(element.itertext()) for element in root.iter())


def test_txt_lists_every_node_and_annotates_every_layer(qmodel, tmp_path):
    text = ptqat_fx.dump(qmodel, tmp_path / "g.txt").read_text()
    for node in qmodel.graph.nodes:
        assert f"%{node.name} = " in text
    for spec in layer_specs(qmodel):
        line = next(line for line in text.splitlines() if f"layer #{spec.index} {spec.name} " in line)
        bits = f"W{spec.w_bits}A{spec.a_bits}" if spec.weight is not None else f" A{spec.a_bits} "
        assert bits in line
        assert ("not selected" in line) == (not spec.selected)


def test_json_follows_the_schema_and_matches_the_model(qmodel, tmp_path):
    record = json.loads(ptqat_fx.dump(qmodel, tmp_path / "g.json").read_text())
    assert record["schema"] == SCHEMA
    assert [layer["name"] for layer in record["layers"]] == [s.name for s in layer_specs(qmodel)]
    assert [n["name"] for n in record["nodes"]] == [n.name for n in qmodel.graph.nodes]
    for layer, spec in zip(record["layers"], layer_specs(qmodel)):
        assert layer["discrepancy"] == pytest.approx(spec.discrepancy)
        assert layer["selected"] == spec.selected
    for path, quantizer in quantizers(qmodel).items():
        scale = quantizer.scale.detach()
        assert record["quantizers"][path]["bits"] == quantizer.bits
        assert record["quantizers"][path]["scale"]["min"] == pytest.approx(float(scale.min()))
        assert record["quantizers"][path]["scale"]["max"] == pytest.approx(float(scale.max()))
        assert record["quantizers"][path]["trainable"] == quantizer.scale.requires_grad


@pytest.mark.parametrize("graph", ["full", "layers"])
@pytest.mark.parametrize("graphviz", [False, True])
def test_svg_parses_and_names_every_layer(qmodel, graph, graphviz):
    if graphviz and shutil.which("dot") is None:
        pytest.skip("graphviz (dot) is not installed")
    text = _svg_text(render_svg(drawing(qmodel, graph), graphviz=graphviz))
    names = [s.name for s in layer_specs(qmodel)] if graph == "layers" else [n.name for n in layer_nodes(qmodel)]
    for name in names:
        assert name in text


@pytest.mark.parametrize("graph", ["full", "layers"])
def test_dot_names_every_layer_and_graphviz_accepts_it(qmodel, graph, tmp_path):
    path = ptqat_fx.dump(qmodel, tmp_path / "g.dot", graph=graph)
    source = path.read_text()
    for spec in layer_specs(qmodel):
        assert spec.name in source
    if shutil.which("dot") is None:
        pytest.skip("graphviz (dot) is not installed")
    result = subprocess.run(["dot", "-Tsvg", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    ElementTree.fromstring(result.stdout)


def test_layout_draws_one_box_per_layer_and_one_arrow_per_edge(qmodel):
    layers = drawing(qmodel, "layers")
    root = ElementTree.fromstring(layout_svg(layers))
    namespace = "{http://www.w3.org/2000/svg}"
    assert len(root.findall(f"{namespace}g")) == len(layer_specs(qmodel))
    assert len(root.findall(f"{namespace}path")) == len(layers.edges) == len(ptqat_fx.report(qmodel).layer_edges)


def test_stage_dumps_appear_in_pipeline_order(tmp_path):
    _quantized("resnet", dump_dir=tmp_path)
    stages = ["traced", "bn_folded", "annotated", "quantizers_inserted", "calibrated", "analysed", "selected", "frozen"]
    assert stage_names(tmp_path) == [f"{i:02d}_{stage}" for i, stage in enumerate(stages, 1)]
    assert len(list(tmp_path.iterdir())) == 4 * len(stages)
    records = {s: json.loads((tmp_path / f"{s}.json").read_text()) for s in stage_names(tmp_path)}
    assert records["01_traced"]["layers"] == [] and records["01_traced"]["quantizers"] == {}
    assert records["04_quantizers_inserted"]["quantizers"]
    assert all(q["mode"] == "observe" for q in records["04_quantizers_inserted"]["quantizers"].values())
    assert all(q["mode"] == "quantize" for q in records["05_calibrated"]["quantizers"].values())
    assert all(not layer["discrepancy"] for layer in records["05_calibrated"]["layers"])
    assert all(layer["discrepancy"] for layer in records["06_analysed"]["layers"])
    assert all(layer["selected"] is None for layer in records["06_analysed"]["layers"])
    frozen = records["08_frozen"]["layers"]
    assert {layer["frozen"] for layer in frozen} == {True, False}
    assert all(layer["frozen"] == (not layer["selected"]) for layer in frozen)


def test_unknown_format_names_the_choices(qmodel, tmp_path):
    with pytest.raises(InputError, match="format 'png'"):
        ptqat_fx.dump(qmodel, tmp_path / "g.png")
    with pytest.raises(InputError, match="graph='layer'"):
        ptqat_fx.dump(qmodel, tmp_path / "g.svg", graph="layer")


def test_heat_runs_from_pale_yellow_to_red():
    assert heat(0.0, 0.0, 1.0) == "#fff7bd"
    assert heat(1.0, 0.0, 1.0) == "#d6301f"
    assert heat(None, 0.0, 1.0) == "#ffffff"
    assert heat(5.0, 5.0, 5.0) == heat(0.0, 0.0, 1.0)
