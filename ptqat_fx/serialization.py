"""``save`` / ``load``: a quantized GraphModule as tensors plus a JSON graph description.

The file is ``torch.save({"format", "version", "description", "tensors", "digest"})``, read back
with ``torch.load(weights_only=True)``: no pickled code. ``digest`` holds the SHA-256 of the
description and of every tensor, checked before anything is built (``digest.verify``): an edited
or corrupted file is refused with the part that failed named. The description lists the modules (torch.nn
classes and ``FakeQuantizer``, rebuilt from their constructor arguments), every parameter,
buffer and tensor attribute (with ``requires_grad`` and persistence), the graph's nodes, and
the metadata the passes keep (``LayerSpec`` with its selection, ``QuantConfig``, the
capture's ``Specialization``...).

Loading an untrusted file does not execute its code, because nothing in it names code: graph
functions resolve only through an allow-list of torch functions, ``torch.nn.functional``,
``operator``, ``math`` and ptqat-fx's own graph functions (``frozen_conv``,
``quantized_linear``..., and ``check_input_shapes``, a shape-specialized graph's check);
methods and attributes are checked against Tensor's public API; module classes only come from ``torch.nn`` (plus ``FakeQuantizer``); and every name that
reaches FX's generated source (node names, placeholders, module and attribute paths, methods,
keyword names, metadata paths) must be an identifier or a dotted path of them; and the loaded
graph's code generator refuses any source but the graph's own (``untrusted.CheckedCodeGen``).
Graphs calling anything else (a user's wrapped function, an ``autograd.Function`` node) are
refused at ``save`` with the node named.
"""
from __future__ import annotations

import builtins
import dataclasses
import inspect
import json
import os
from typing import Any

import torch
from torch import fx, nn

from .capture.specialization import Specialization
from .config import QuantConfig, Select
from .digest import digests, read_tensors_only, verify
from .errors import SerializationError
from .layer_spec import LayerSpec
from .meta import FOLDED_BN, FROZEN, LAYER
from .runtime.quantizer import FakeQuantizer
from .untrusted import FUNCTIONS, CheckedCodeGen, check_name, check_path, check_strings, function_name

FORMAT = "ptqat-fx.graph"
# 2: a SHA-256 digest of the description and of every tensor (1 had none).
VERSION = 2
_CONTAINERS = {cls.__name__: cls for cls in (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)}
_DATACLASSES = {cls.__name__: cls for cls in (LayerSpec, QuantConfig, Select, Specialization)}
_GETATTR_NAMES = {"shape", "dtype", "device", "ndim", "T", "mT", "layout", "is_cuda", "requires_grad"}
# Tensor methods that reach storage, files or callbacks.
_DENIED_METHODS = {"storage", "untyped_storage", "share_memory_", "register_hook", "apply_", "map_",
                   "map2_", "register_post_accumulate_grad_hook", "set_", "backward"}
_NODE_META_KEYS = {FROZEN, FOLDED_BN}  # ptqat-fx's node metadata without the ptqat_ prefix


def _encode(value: Any, where: str) -> Any:
    """JSON form of a node argument or metadata value (tagged where JSON has no type)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, where) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    for kind in (torch.dtype, torch.memory_format, torch.layout):
        if isinstance(value, kind):
            return {kind.__name__: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if callable(value) and function_name(value) is not None:
        return {"function": function_name(value)}
    if dataclasses.is_dataclass(value) and type(value).__name__ in _DATACLASSES:
        fields = {f.name: _encode(getattr(value, f.name), where) for f in dataclasses.fields(value)}
        return {"dataclass": type(value).__name__, "fields": fields}
    raise SerializationError(f"{where}: cannot save a value of type {type(value).__name__} ({value!r})")


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict) or len(value) not in (1, 2):
        raise SerializationError(f"unreadable value {value!r}; the file is corrupt")
    (tag, payload), *_ = value.items()
    if tag == "node":
        if payload not in env:
            raise SerializationError(f"argument refers to unknown node {payload!r}; the file is corrupt")
        return env[payload]
    if tag == "tuple":
        return tuple(_decode(v, env) for v in payload)
    if tag == "dict":
        return {k: _decode(v, env) for k, v in payload.items()}
    if tag == "slice":
        return slice(*(_decode(v, env) for v in payload))
    if tag == "ellipsis":
        return Ellipsis
    if tag in ("dtype", "memory_format", "layout"):
        result = getattr(torch, check_name(payload, f"torch.{tag}"), None)
        if type(result).__name__ != tag:
            raise SerializationError(f"unknown torch.{tag} {payload!r}")
        return result
    if tag == "device":
        return torch.device(payload)
    if tag == "function" and payload in FUNCTIONS:
        return FUNCTIONS[payload]
    if tag == "dataclass" and payload in _DATACLASSES:
        fields = {check_name(k, f"{payload} field"): _decode(v, env) for k, v in value["fields"].items()}
        return _DATACLASSES[payload](**fields)
    raise SerializationError(f"unreadable value tagged {tag!r}; the file is corrupt")


def _module_arguments(module: nn.Module, path: str) -> dict[str, Any]:
    """Constructor arguments that rebuild ``module`` (checked by comparing ``extra_repr``)."""
    if isinstance(module, FakeQuantizer):
        return {"bits": module.bits, "signed": module.signed, "channel_axis": module.channel_axis,
                "channels": module.scale.numel(), "observer": module.observer.method,
                "percentile": module.observer.percentile}
    if type(module).__name__ in _CONTAINERS:
        return {}
    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls:
        raise SerializationError(
            f"module {path!r} is a {cls.__module__}.{cls.__qualname__}: save() rebuilds only torch.nn "
            "modules and FakeQuantizer (loading must not run code from the file); keep it out of "
            "leaf_modules so it is traced into torch ops"
        )
    arguments = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "device", "dtype") or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        value = getattr(module, name, parameter.default)
        if isinstance(parameter.default, bool) and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        if value is inspect.Parameter.empty:
            raise SerializationError(f"module {path!r} ({cls.__name__}): no attribute for argument {name!r}")
        arguments[name] = value
    return arguments


def _construct(class_name: str, arguments: dict[str, Any], path: str) -> nn.Module:
    check_name(class_name, f"module {path!r}: class")
    if class_name == FakeQuantizer.__name__:
        cls = FakeQuantizer
    elif class_name in _CONTAINERS:
        cls = _CONTAINERS[class_name]
    else:
        cls = getattr(nn, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise SerializationError(f"module {path!r}: {class_name!r} is not a torch.nn module class")
    with torch.device("meta"):
        return cls(**arguments)


def _build_module(class_name: str, arguments: dict[str, Any], path: str) -> nn.Module:
    """The module of ``class_name`` without children, parameters or buffers (added later)."""
    module = _construct(class_name, arguments, path)
    for child in list(module._modules):
        delattr(module, child)
    module._parameters.clear()
    module._buffers.clear()
    module._non_persistent_buffers_set.clear()
    return module


def _describe_module(module: nn.Module, path: str) -> dict[str, Any]:
    arguments = _module_arguments(module, path)
    description = {"class": type(module).__name__, "arguments": _encode(arguments, f"module {path!r}"),
                   "training": module.training}
    rebuilt = _construct(description["class"], arguments, path)
    if isinstance(module, FakeQuantizer):
        description["mode"] = rebuilt.mode = module.mode
    if rebuilt.extra_repr() != module.extra_repr():
        raise SerializationError(
            f"module {path!r} ({type(module).__name__}) does not rebuild from its constructor "
            f"arguments ({rebuilt.extra_repr()!r} != {module.extra_repr()!r}); it cannot be saved"
        )
    return description


def _describe_tensors(gm: fx.GraphModule) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    entries, tensors = [], {}
    for prefix, module in gm.named_modules(remove_duplicate=False):
        owned = [(n, t, "parameter") for n, t in module._parameters.items()]
        owned += [(n, t, "buffer") for n, t in module._buffers.items()]
        for name, tensor, kind in owned:
            path = f"{prefix}.{name}" if prefix else name
            entry = {"path": path, "kind": kind, "none": tensor is None}
            if tensor is not None:
                entry["requires_grad"] = tensor.requires_grad
                tensors[path] = tensor.detach()
            if kind == "buffer":
                entry["persistent"] = name not in module._non_persistent_buffers_set
            entries.append(entry)
    known = set(tensors) | {p for p, _ in gm.named_modules()}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in known:
            owner, _, leaf = node.target.rpartition(".")
            value = getattr(gm.get_submodule(owner), leaf)
            if not isinstance(value, torch.Tensor):
                raise SerializationError(f"node {node.name!r}: get_attr {node.target!r} is a {type(value).__name__}, not a tensor")
            entries.append({"path": node.target, "kind": "attribute", "none": False, "requires_grad": value.requires_grad})
            tensors[node.target] = value.detach()
    return entries, tensors


def _describe_node(node: fx.Node) -> dict[str, Any]:
    where = f"node {node.name!r}"
    target = node.target
    if node.op == "call_function":
        name = function_name(target)
        if name is None:
            raise SerializationError(
                f"{where} calls {getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)!r}, "
                "which is not a torch, torch.nn.functional, operator, math or ptqat-fx graph function; save() refuses "
                "it because load() must not run code from the file (autograd.Function and torch.fx.wrap "
                "nodes cannot be saved)"
            )
        target = name
    meta = {}
    for key, value in node.meta.items():
        try:
            meta[key] = _encode(value, where)
        except SerializationError:
            continue  # tracer bookkeeping (module stacks, tensor metadata) is rebuilt or unneeded
    return {"name": node.name, "op": node.op, "target": target, "args": _encode(node.args, where),
            "kwargs": _encode(node.kwargs, where), "meta": meta, "tensor_type": node.type in (torch.Tensor, "torch.Tensor")}


def save(qmodel: fx.GraphModule, path: str | os.PathLike) -> None:
    """Write ``qmodel`` (fake-quant, frozen or converted) to ``path``; see the module docstring.

    Raises:
        SerializationError: a module, function or value that ``load`` could not rebuild
            without running code (the message names it).
    """
    entries, tensors = _describe_tensors(qmodel)
    modules = [{"path": p, **_describe_module(m, p)} for p, m in qmodel.named_modules() if p]
    meta = {}
    for key, value in qmodel.meta.items():
        try:
            meta[key] = _encode(value, "GraphModule.meta")
        except SerializationError:
            continue
    description = {"class_name": type(qmodel).__name__, "training": qmodel.training, "modules": modules,
                   "tensors": entries, "nodes": [_describe_node(n) for n in qmodel.graph.nodes], "meta": meta}
    text = json.dumps(description)
    torch.save({"format": FORMAT, "version": VERSION, "description": text, "tensors": tensors,
                "digest": digests(text, tensors)}, os.fspath(path))


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    payload = read_tensors_only(path, "ptqat-fx file")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SerializationError(f"{os.fspath(path)!r} was not written by ptqat_fx.save")
    version = payload.get("version")
    if isinstance(version, int) and version > VERSION:
        raise SerializationError(
            f"{os.fspath(path)!r} has format version {version}, written by a newer ptqat-fx; this one reads "
            f"version {VERSION}: upgrade ptqat-fx to load it"
        )
    if version != VERSION:
        raise SerializationError(
            f"{os.fspath(path)!r} has format version {version!r}; this ptqat-fx reads version {VERSION} "
            "(version 1 files carry no integrity digest): save the model again with this ptqat-fx"
        )
    if not isinstance(payload.get("description"), str) or not isinstance(payload.get("tensors"), dict):
        raise SerializationError(f"{os.fspath(path)!r}: no graph description or tensors; the file is corrupt")
    verify(payload.get("digest"), payload["description"], payload["tensors"], repr(os.fspath(path)))
    try:
        return json.loads(payload["description"]), payload["tensors"]
    except (KeyError, TypeError, ValueError) as error:
        raise SerializationError(f"{os.fspath(path)!r}: unreadable graph description ({error})") from error


def _check_target(target: Any, allowed: set[str], node: str) -> str:
    if not isinstance(target, str) or target not in allowed:
        raise SerializationError(f"node {node!r}: target {str(target)[:80]!r} is not a saved module or tensor; the file is corrupt")
    return target


def _node_meta(spec: dict[str, Any], node: str) -> dict[str, Any]:
    """The ptqat-fx metadata of a node, every string in it checked to be a plain dotted path.

    Only ptqat-fx's own keys are restored (FX's ``stack_trace`` and the like would reach the
    generated source as comments); passes later build nodes from these paths (``convert``).
    """
    meta = {}
    for key, value in spec.items():
        if not (key.startswith("ptqat_") or key in _NODE_META_KEYS):
            continue
        value = _decode(value, {})
        if key == LAYER:
            if not isinstance(value, LayerSpec):
                raise SerializationError(f"node {node!r}: {LAYER} is not a LayerSpec; the file is corrupt")
            # The name may carry "#k" (k-th call); the paths are what passes turn into nodes.
            check_strings([value.kind, value.module_path, value.weight, value.bias, value.weight_quantizer,
                            *value.input_quantizers], f"node {node!r}: LayerSpec")
        else:
            check_strings(value, f"node {node!r}: meta {key!r}")
        meta[key] = value
    return meta


def _rebuild_graph(nodes: list[dict[str, Any]], modules: set[str], attributes: set[str]) -> fx.Graph:
    """The graph, built node by node through ``fx.Graph.create_node``; every name is checked, and
    the graph's code generator (``CheckedCodeGen``) refuses any source but the graph's own."""
    graph = fx.Graph()
    graph.set_codegen(CheckedCodeGen())
    env: dict[str, fx.Node] = {}
    for spec in nodes:
        op, target, name = spec["op"], spec["target"], check_name(spec["name"], "node name")
        if op == "placeholder":
            check_name(target, "placeholder")
        elif op == "call_function":
            if not isinstance(target, str) or target not in FUNCTIONS:
                raise SerializationError(f"node {name!r} calls {str(target)[:80]!r}, which is not an allowed function")
            target = FUNCTIONS[target]
        elif op == "call_method":
            if check_name(target, "method").startswith("_") or target in _DENIED_METHODS or not hasattr(torch.Tensor, target):
                raise SerializationError(f"node {name!r}: method {target!r} is not an allowed Tensor method")
        elif op == "call_module":
            _check_target(check_path(target, "module path"), modules, name)
        elif op == "get_attr":
            _check_target(check_path(target, "attribute target"), attributes | modules, name)
        elif op != "output":
            raise SerializationError(f"node {name!r}: unknown op {str(op)[:80]!r}; the file is corrupt")
        args, kwargs = _decode(spec["args"], env), _decode(spec["kwargs"], env)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise SerializationError(f"node {name!r}: malformed arguments; the file is corrupt")
        for key in kwargs:
            check_name(key, f"node {name!r}: keyword")
        if target is builtins.getattr and (len(args) != 2 or args[1] not in _GETATTR_NAMES):
            raise SerializationError(f"node {name!r}: getattr of {args[1:]!r} is not allowed")
        node = graph.create_node(op, target, args, kwargs, name=name,
                                 type_expr=torch.Tensor if spec.get("tensor_type") else None)
        if node.name != name:  # FX renamed it: a duplicate, or a name that shadows a global
            raise SerializationError(f"node name {name!r} is taken or reserved; the file is corrupt or crafted")
        node.meta.update(_node_meta(spec["meta"], name))
        env[name] = node
    graph.lint()
    return graph


def load(path: str | os.PathLike) -> fx.GraphModule:
    """Read a model written by ``save``: same graph, tensors (bit-identical), ``requires_grad``
    flags, train/eval modes, quantizer modes and metadata (``LayerSpec.selected``...).

    Nothing from the file is evaluated: the digests are checked first, every name and path is
    checked (``untrusted.check_name`` / ``check_path``), modules and call targets come from
    allow-lists, and the graph's code generator refuses any source but the graph's own.

    Raises:
        SerializationError: the file is truncated, corrupted or edited (names what failed), of
            another format or version, or names something outside the allow-lists.
    """
    description, tensors = _read(path)
    try:
        class_name = check_name(description["class_name"], "class name")
        gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name=class_name)
        for spec in description["modules"]:
            check_path(spec["path"], "module path")
            module = _build_module(spec["class"], _decode(spec["arguments"], {}), spec["path"])
            module.train(spec["training"])
            if "mode" in spec:
                module.mode = spec["mode"]
            parent, _, leaf = spec["path"].rpartition(".")
            gm.get_submodule(parent).add_module(leaf, module)
        for entry in description["tensors"]:
            owner, _, leaf = check_path(entry["path"], "tensor path").rpartition(".")
            module = gm.get_submodule(owner)
            tensor = None if entry["none"] else tensors[entry["path"]]
            if entry["kind"] == "parameter":
                module.register_parameter(leaf, None if tensor is None else nn.Parameter(tensor, entry["requires_grad"]))
            elif entry["kind"] == "buffer":
                module.register_buffer(leaf, tensor, persistent=entry["persistent"])
            else:
                setattr(module, leaf, tensor.requires_grad_(entry["requires_grad"]))
        modules = {spec["path"] for spec in description["modules"]}
        gm.graph = _rebuild_graph(description["nodes"], modules, {e["path"] for e in description["tensors"]})
        gm.meta.update({check_name(key, "meta key"): _decode(value, {}) for key, value in description["meta"].items()})
        gm.training = description["training"]
    except SerializationError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as error:
        raise SerializationError(f"{os.fspath(path)!r}: inconsistent graph description ({type(error).__name__}: {str(error)[:200]})") from error
    return gm
