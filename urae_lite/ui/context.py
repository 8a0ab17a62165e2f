"""What every tab shares (no Gradio here): the folders, the loaded pipeline, the training runs, the models offered,
and how a user's mistake reaches the page (the CLI's one line, the server going on)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UraeError
from .paths import Folders
from .session import Session
from .train_runs import TrainRuns


@dataclass
class UiContext:
    folders: Folders
    models: list[str]  # the models the page offers (`urae-lite ui --model`, repeatable): no path is typed for them
    session: Session
    runs: TrainRuns
    cuda: bool  # generation runs on CUDA (else on the CPU: the plan is for a card the user names)

    @classmethod
    def create(cls, folders: Folders, models: list[str]) -> UiContext:
        import torch

        runs = TrainRuns(folders)
        return cls(folders, models, Session(busy=runs.active), runs, torch.cuda.is_available())

    def model(self, name: str | None) -> str:
        """One of the offered models (the first when none is picked); anything else is refused."""
        if not name:
            return self.models[0]
        if name not in self.models:
            raise UraeError(f"model {name!r} is not one this page was started with ({', '.join(self.models)})")
        return name


def one_line_errors(fn: Callable) -> Callable:
    """A UraeError becomes gr.Error with the same line: the page shows it and the server keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import gradio as gr

        try:
            return fn(*args, **kwargs)
        except UraeError as e:
            raise gr.Error(str(e), print_exception=False) from None

    return wrapper


def blank(value):
    """A page field left empty (None, "", or the `preset` / `pick for me` choice) -> None."""
    if isinstance(value, str):
        value = value.strip()
    return None if value in (None, "", "preset", "pick for me") else value


def number(value, name: str) -> float | None:
    """An optional number field (a text box: a browser sends an empty number box as 0, which is a value here)."""
    value = blank(value)
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UraeError(f"{name}: expected a number, got {value!r}") from None


def whole(value, name: str = "value") -> int | None:
    """An optional whole-number field."""
    x = number(value, name)
    if x is None:
        return None
    if not x.is_integer():
        raise UraeError(f"{name}: expected a whole number, got {value!r}")
    return int(x)
