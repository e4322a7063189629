"""Stage dumps: ``quantize(..., dump_dir=)`` writes the graph after every pass, numbered, so
that ``ls`` shows the pipeline::

    01_traced.txt  01_traced.json  01_traced.dot  01_traced.svg
    02_bn_folded.*  03_annotated.*  04_quantizers_inserted.*  05_calibrated.*
    06_analysed.*  07_selected.*  08_frozen.*

Stages that do not run (no BatchNorm folding, ``select=None``) are not numbered.
"""
from __future__ import annotations

from pathlib import Path

from torch import fx

from . import dump

STAGE_FORMATS = ("txt", "json", "dot", "svg")


class StageDumper:
    """``after(stage, gm)`` dumps ``gm`` as the next numbered stage and returns it; a no-op
    when ``dump_dir`` is None.

    Args:
        dump_dir: the folder to write to (created), or None.
        first: the number of the first stage written.
    """

    def __init__(self, dump_dir: str | Path | None, first: int = 1) -> None:
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.number = first

    def __call__(self, stage: str, gm: fx.GraphModule) -> fx.GraphModule:
        if self.dump_dir is not None:
            for format in STAGE_FORMATS:
                dump(gm, self.dump_dir / f"{self.number:02d}_{stage}.{format}", format)
            self.number += 1
        return gm


def stage_names(dump_dir: str | Path) -> list[str]:
    """The stages dumped in ``dump_dir``, in order (``["01_traced", ...]``)."""
    return sorted({path.name.split(".")[0] for path in Path(dump_dir).glob("[0-9][0-9]_*.json")})
