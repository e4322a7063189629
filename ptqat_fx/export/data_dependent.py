"""Capture for export of a graph whose leaf modules branch on tensor values.

A leaf module runs its own ``forward``; where that forward decides on tensor values
(``if x.abs().amax() > 1e3:``, ``if len(x.nonzero()) == 0:``), ``torch.export`` cannot capture
it: the decision is data-dependent (``GuardOnDataDependentSymNode``). ``specialised_program``
captures it with ``torch.export.draft_export`` instead, which runs the example inputs along and
takes each such decision as they do: the program holds the path the example inputs took (the
operations themselves, ``nonzero`` included, stay data-dependent where ONNX can express them).
Each decision is reported in a ``UserWarning`` naming the leaf and the source line, since an
input that decides otherwise gets the example's path in the exported graph.

The runtime assertions draft export adds for these decisions are dropped: ONNX has no
assertion op, and the value chains only they read (which torch's ONNX translation may not
handle: ``amax`` without ``dim``) go with them.
"""
from __future__ import annotations

import inspect
import warnings

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from ..dead_code import eliminate_dead_code
from ..errors import InputError

# Draft export's real-tensor propagation has taken a decision the example inputs do not take
# (torch 2.13, now and then, in the same process and input: a branch on ``amax`` came out True
# where the eager value is False); the program's own assertions catch that, and a new capture
# usually decides right.
_ATTEMPTS = 3
_ASSERTIONS = (
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten.sym_constrain_range_for_size.default,
    torch.ops.aten.sym_constrain_range.default,
)


def is_data_dependent(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a data-dependent guard."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, GuardOnDataDependentSymNode):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _leaf_at(gm: fx.GraphModule, filename: str | None, line: int, code: str) -> tuple[str, str] | None:
    """(path, source file) of the module ``gm`` calls whose ``forward`` holds ``code`` at
    ``filename:line`` (in any file where draft export did not record it)."""
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        forward = type(gm.get_submodule(node.target)).forward
        try:
            source, first = inspect.getsourcelines(forward)
            where = inspect.getsourcefile(forward)
        except (OSError, TypeError):
            continue
        inside = first <= line < first + len(source) and source[line - first].strip() == code.strip()
        if inside and filename in (None, where):
            return node.target, where
    return None


def _decision(gm: fx.GraphModule, failure: object, filenames: dict[int, str]) -> str:
    """One draft-export failure as ``leaf 'body' at file:line (`code`): expr taken as value``."""
    data = failure.data
    frame = (data.get("user_stack") or [{}])[-1]
    filename, line, code = filenames.get(frame.get("filename")), frame.get("line", 0), frame.get("loc", "")
    leaf = _leaf_at(gm, filename, line, code)
    where = f"leaf module {leaf[0]!r} at {leaf[1]}:{line}" if leaf else f"{filename or '?'}:{line}"
    return f"{where} (`{code}`): {data.get('expr')} taken as {data.get('result')}"


def specialised_program(
    gm: fx.GraphModule, example_inputs: tuple, dynamic_shapes: tuple | None
) -> torch.export.ExportedProgram:
    """``gm`` captured along the path ``example_inputs`` take through its data-dependent
    decisions (see the module docstring), each reported in a ``UserWarning``.

    Raises:
        InputError: draft export met a problem other than a data-dependent decision (the
            message lists them), or its captures kept taking decisions the example inputs do not.
    """
    for attempt in range(_ATTEMPTS):
        program = torch.export.draft_export(gm, example_inputs, dynamic_shapes=dynamic_shapes)
        try:
            # The program asserts each decision it took; the example inputs must pass them.
            with torch.no_grad():
                program.module()(*example_inputs)
            break
        except Exception as error:  # noqa: BLE001 - a failed runtime assertion, as torch raises it
            failed = error
    else:
        raise InputError(
            f"export_onnx: torch.export cannot capture decisions on tensor values, and draft export's "
            f"capture along the example inputs' path took other decisions than they do in {_ATTEMPTS} "
            f"attempts ({str(failed).splitlines()[0][:200]}); trace the leaf's decision out of the "
            "model (torch.cond, or compute it outside forward)"
        ) from failed
    report = program._report  # draft export's only account of what it assumed (torch.onnx reads it too)
    decisions, others = [], []
    for failure in report.failures:
        if failure.failure_type.name == "DATA_DEPENDENT_ERROR":
            decisions.append(_decision(gm, failure, report.str_to_filename))
        else:
            others.append(failure.print(report.str_to_filename).strip().splitlines()[0])
    if others:
        raise InputError(
            "export_onnx: torch.export cannot capture this graph, even along the example inputs' path: "
            + "; ".join(others[:3])
        )
    warnings.warn(
        "export_onnx: torch.export cannot capture decisions on tensor values, so the ONNX graph takes "
        "the path the example inputs took: " + "; ".join(decisions) + ". Inputs that decide otherwise "
        "get the example's path; export with example inputs typical of deployment",
        UserWarning, stacklevel=3,
    )
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.target in _ASSERTIONS and not node.users:
            graph.erase_node(node)
    eliminate_dead_code(graph)
    program.graph_module.recompile()
    return program
