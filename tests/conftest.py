"""Session setup shared by every test file."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton LSQ kernels (runtime/lsq_kernels.py) run only under the Triton
    # interpreter, which must be chosen before anything imports triton; the package imports it
    # with the quantizer, so it is chosen here, before any test module is collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")
