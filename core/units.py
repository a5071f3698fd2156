"""How a stage function runs its units of work (a modality generated or prepared, a task evaluated or exported):
it calls `unit(name, fn, *args)` where a plain program would call `fn(*args)`. Alone it runs `plain`; its Prefect
flow (flows/stages.py) passes a Unit that runs each as a task, so that the UI shows what ran, for how long, and
which one failed. Nothing here knows Prefect."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Unit(Protocol):
    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any: ...


def plain(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)`: `name` only says what it is."""
    return fn(*args)
