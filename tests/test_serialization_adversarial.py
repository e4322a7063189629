"""Crafted and corrupted ``.ptqat`` files: every one is refused with SerializationError, and no
payload runs, neither at ``load`` nor when the graph's source is generated later (forward, convert).

Each crafted file re-computes the digest, as an attacker would: the names themselves are refused.
"""
from __future__ import annotations

import builtins
import json
import pickle
import zipfile

import pytest
import torch

import ptqat_fx
from ptqat_fx.digest import digests
from tests.export.quantized_examples import example_input, quantized


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "m.ptqat"
    ptqat_fx.save(quantized("mlp", 4, select=ptqat_fx.Select()), path)
    return path


def _payload(marker):
    """Python that would create ``marker`` and set a builtin if it ever ran."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch() or setattr(__import__('builtins'), 'PWNED', 1)"


def _injections(marker):
    code = _payload(marker)
    return {
        "quote": f'fc1"), {code}, getattr(self, "fc1',
        "cr": f"fc1\r{code}",
        "newline": f"fc1\n    {code}\n    x = fc1",
        "dedent": f"fc1\n{code}\ndef _(self):\n    x = 1",
        "exec": f"exec({code!r})",
        "dunder": "fc1.__class__.__init__.__globals__",
        "keyword": "import",
        "overlong": "a" * 5000,
        "unicode": "fc\u0131",
    }


def _first(op):
    return lambda d: next(n for n in d["nodes"] if n["op"] == op)


def _set_spec_path(d, value):
    node = next(n for n in d["nodes"] if "ptqat_layer" in n["meta"])
    node["meta"]["ptqat_layer"]["fields"]["weight"] = value


# One editor per field of the description that names something.
FIELDS = {
    "node-name": lambda d, v: d["nodes"][1].update(name=v),
    "placeholder": lambda d, v: _first("placeholder")(d).update(target=v),
    "call-module-target": lambda d, v: _first("call_module")(d).update(target=v),
    "get-attr-target": lambda d, v: _first("get_attr")(d).update(target=v),
    "call-method-target": lambda d, v: d["nodes"][1].update(op="call_method", target=v),
    "call-function-target": lambda d, v: d["nodes"][1].update(op="call_function", target=v),
    "keyword-name": lambda d, v: _first("call_function")(d)["kwargs"]["dict"].update({v: 1}),
    "module-path": lambda d, v: d["modules"][0].update(path=v),
    "module-class": lambda d, v: d["modules"][0].update({"class": v}),
    "tensor-path": lambda d, v: d["tensors"][0].update(path=v),
    "class-name": lambda d, v: d.update(class_name=v),
    "layer-spec-path": _set_spec_path,
    "dtype": lambda d, v: d["nodes"][1].update(args={"tuple": [{"dtype": v}]}),
    "dataclass-field": lambda d, v: d["meta"]["ptqat_config"]["fields"].update({v: 1}),
    "graph-meta-key": lambda d, v: d["meta"].update({v: 1}),
    "op": lambda d, v: d["nodes"][1].update(op=v),
}


def _craft(saved, tmp_path, edit):
    payload = torch.load(saved, weights_only=True)
    description = json.loads(payload["description"])
    edit(description)
    payload["description"] = json.dumps(description)
    payload["digest"] = digests(payload["description"], payload["tensors"])
    torch.save(payload, tmp_path / "crafted.ptqat")
    return tmp_path / "crafted.ptqat"


@pytest.mark.parametrize("field", list(FIELDS))
@pytest.mark.parametrize("kind", list(_injections("m")))
def test_crafted_names_are_refused_and_never_run(saved, tmp_path, field, kind):
    marker = tmp_path / "pwned"
    value = _injections(marker)[kind]
    path = _craft(saved, tmp_path, lambda d: FIELDS[field](d, value))
    with pytest.raises(ptqat_fx.SerializationError):
        ptqat_fx.load(path)
    assert not marker.exists() and not hasattr(builtins, "PWNED")


def test_a_name_that_escapes_the_checks_still_never_reaches_exec(saved, tmp_path):
    """The depth: a loaded graph's code generator refuses a source holding anything but the graph,
    so a name slipped in after load (as a pass would build it from metadata) cannot run at the
    next recompile (forward after ``convert``...)."""
    marker = tmp_path / "pwned"
    loaded = ptqat_fx.load(saved)
    x = example_input("mlp")
    expected = loaded(x)
    for value in list(_injections(marker).values())[:5]:
        node = next(n for n in loaded.graph.nodes if n.op == "get_attr")
        original, node.target = node.target, value
        with pytest.raises(ptqat_fx.SerializationError, match="generated source"):
            loaded.recompile()
        node.target = original
    loaded.recompile()
    assert torch.equal(loaded(x), expected)
    assert not marker.exists() and not hasattr(builtins, "PWNED")


def test_stack_trace_metadata_is_not_restored(saved, tmp_path):
    """FX writes a node's stack trace into the generated source as a comment: not restored."""
    marker = tmp_path / "pwned"
    trace = f'File "x.py", line 1, in f\n    y\n{_payload(marker)}\n'
    path = _craft(saved, tmp_path, lambda d: d["nodes"][1]["meta"].update(stack_trace=trace))
    loaded = ptqat_fx.load(path)
    assert all("stack_trace" not in n.meta for n in loaded.graph.nodes)
    loaded(example_input("mlp"))
    assert not marker.exists() and not hasattr(builtins, "PWNED")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (_payload(self.marker),))


def test_pickle_payload_is_refused(saved, tmp_path):
    marker = tmp_path / "pwned"
    payload = torch.load(saved, weights_only=True)
    payload["tensors"]["evil"] = _Evil(marker)
    torch.save(payload, tmp_path / "evil.ptqat")
    with open(tmp_path / "plain.pkl", "wb") as file:
        pickle.dump(_Evil(marker), file)
    for name in ("evil.ptqat", "plain.pkl"):
        with pytest.raises(ptqat_fx.SerializationError, match="not a readable ptqat-fx file"):
            ptqat_fx.load(tmp_path / name)
    assert not marker.exists() and not hasattr(builtins, "PWNED")


def test_same_length_bits_edit_is_refused(saved, tmp_path):
    data = saved.read_bytes()
    assert b'"bits": 4' in data
    (tmp_path / "edited.ptqat").write_bytes(data.replace(b'"bits": 4', b'"bits": 2', 1))
    with pytest.raises(ptqat_fx.SerializationError, match="description .* does not match its SHA-256 digest"):
        ptqat_fx.load(tmp_path / "edited.ptqat")


def _tensor_data_spans(path):
    """(start, end) byte ranges of the tensor records in a torch.save zip archive."""
    spans = []
    with zipfile.ZipFile(path) as archive:
        raw = path.read_bytes()
        for info in archive.infolist():
            if "/data/" in info.filename and info.file_size:
                header = info.header_offset
                name_length = int.from_bytes(raw[header + 26:header + 28], "little")
                extra_length = int.from_bytes(raw[header + 28:header + 30], "little")
                start = header + 30 + name_length + extra_length
                spans.append((start, start + info.file_size))
    return spans


def test_byte_flips_in_tensor_data_are_all_refused(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    spans = _tensor_data_spans(saved)
    generator = torch.Generator().manual_seed(0)
    flips = 0
    for start, end in spans:
        for offset in torch.randint(start, end, (max(1, 60 // len(spans)),), generator=generator).tolist():
            corrupted = bytearray(data)
            corrupted[offset] ^= 1 << int(torch.randint(0, 8, (1,), generator=generator))
            (tmp_path / "flipped.ptqat").write_bytes(bytes(corrupted))
            with pytest.raises(ptqat_fx.SerializationError, match=r"tensor '.*' does not match|not a readable"):
                ptqat_fx.load(tmp_path / "flipped.ptqat")
            flips += 1
    assert flips >= 40


def test_byte_flips_anywhere_are_refused_or_change_nothing(saved, tmp_path):
    """Flips in zip bookkeeping (header padding, records torch does not read) leave the content
    as it was; every other flip is refused. None loads a different model."""
    data = saved.read_bytes()
    reference = ptqat_fx.load(saved)
    x = example_input("mlp")
    refused = 0
    for offset in range(0, len(data), max(1, len(data) // 80)):
        corrupted = bytearray(data)
        corrupted[offset] ^= 0x20
        (tmp_path / "flipped.ptqat").write_bytes(bytes(corrupted))
        try:
            loaded = ptqat_fx.load(tmp_path / "flipped.ptqat")
        except ptqat_fx.SerializationError:
            refused += 1
            continue
        assert loaded.code == reference.code and torch.equal(loaded(x), reference(x)), offset
        assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items()), offset
    assert refused >= 60


@pytest.mark.parametrize("version,message", [(3, "newer ptqat-fx.*upgrade"), (1, "save the model again"), ("2", "version")])
def test_format_versions(saved, tmp_path, version, message):
    payload = torch.load(saved, weights_only=True)
    payload["version"] = version
    torch.save(payload, tmp_path / "v.ptqat")
    with pytest.raises(ptqat_fx.SerializationError, match=message):
        ptqat_fx.load(tmp_path / "v.ptqat")
