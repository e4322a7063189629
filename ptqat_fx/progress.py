"""Progress bars that stay silent when asked to, or when output is not a terminal."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], desc: str, enabled: bool, **kwargs: Any) -> Iterable[T]:
    """``tqdm(iterable)`` when ``enabled`` and stderr is a terminal, else ``iterable`` as is."""
    return tqdm(iterable, desc=desc, disable=None if enabled else True, leave=False, **kwargs)
