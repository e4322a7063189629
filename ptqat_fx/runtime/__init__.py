"""What runs inside a quantized graph: the LSQ quantizer and its observers, the frozen and
fused layer ops, module-level quantized layers (and their lowered forms, ``lowered_layers``),
traceable attention and opaque calls.

Nothing here imports a pass, the API, the CLI, training, export or views
(``tests/test_import_rules.py`` checks it).
"""
