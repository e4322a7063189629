"""A selection rule (``Select``) in the words a user would say, for the report and its page."""
from __future__ import annotations

from ..config import Select

_METRIC_WORDS = {"euclidean": "Euclidean distance", "relative": "relative error", "mse": "mean squared error", "cosine": "cosine distance"}


def selection_words(select: Select | None, threshold: float | None = None) -> str:
    """``select`` as a user would say it, e.g. "small-discrepancy half by accumulated relative
    error, theta 0.065"; ``threshold``, when known, is the discrepancy that separated the
    selected layers from the rest."""
    if select is None:
        return "none (every layer trainable)"
    if select.strategy == "all":
        return "every layer (full QAT)"
    if select.strategy == "none":
        return "no layer (pure PTQ)"
    # The cut that select_layers applies: theta first (ranked strategies only), then the budget.
    if select.theta is not None and select.strategy != "random":
        cut = "layers " + ("below" if select.strategy == "small" else "above") + f" theta {select.theta:g}"
    elif select.param_budget is not None:
        cut = f"layers within {select.param_budget:.0%} of the layer parameters"
    else:
        fraction = 0.5 if select.fraction is None else select.fraction
        cut = "half" if fraction == 0.5 else f"{fraction:.0%} of the layers"
    if select.strategy == "random":
        words = f"random {cut}, seed {select.seed}"
    else:
        words = f"{select.strategy}-discrepancy {cut} by {select.mode} {_METRIC_WORDS[select.metric]}"
        if threshold is not None and select.theta is None:
            words += f", theta {threshold:.3g}"
    return words + (", other parameters trained too" if select.train_other_params else "")
