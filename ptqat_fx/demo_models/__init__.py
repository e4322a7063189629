"""Small models shipped with the package, for ``ptqat-fx demo`` (the library never imports
``examples/``, which a pip install does not have)."""
