"""What a command prints: its own progress, results and errors, nothing from the libraries underneath.

diffusers, transformers, bitsandbytes and friends log notes and warnings that are about their internals (a
torchvision fallback, a hub kernel that is not installed, a deprecated keyword we do not pass), and some of them
would come out under our `urae-lite:` prefix if we configured the root logger. So our messages go through the
`urae_lite` logger's own handler (the root logger stays unconfigured), and the libraries' loggers, verbosity
settings and Python warnings are turned down at the source for the command's run; `--debug` leaves them all as
the libraries set them.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: libraries whose loggers and warnings a command keeps quiet (their errors still show)
LIBRARIES = (
    "accelerate",
    "bitsandbytes",
    "diffusers",
    "huggingface_hub",
    "optimum",
    "peft",
    "safetensors",
    "tokenizers",
    "torch",
    "transformers",
    "triton",
    "PIL",
)
#: the libraries' own verbosity switches, read when they first configure their loggers
_VERBOSITY_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
PREFIX = "urae-lite: "


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the message (it may be replaced after setup)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def our_logger() -> logging.Logger:
    """The `urae_lite` logger, printing `urae-lite: message` on stderr at INFO (configured once)."""
    logger = logging.getLogger("urae_lite")
    if not any(getattr(h, "_urae_lite", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(f"{PREFIX}%(message)s"))
        handler._urae_lite = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def quiet_libraries() -> None:
    """Silence the libraries' logging, progress bars and Python warnings for this process (a command's run)."""
    for key, value in _VERBOSITY_ENV.items():
        os.environ.setdefault(key, value)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    pattern = "|".join(LIBRARIES)
    warnings.filterwarnings("ignore", module=rf"({pattern})(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    _library_switches()


def _library_switches() -> None:
    """diffusers and transformers set their loggers' level when first used; set it through their own API too."""
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        lib = sys.modules.get(module)
        if lib is not None:
            lib.set_verbosity_error()
            lib.disable_progress_bar()


def setup(debug: bool = False) -> None:
    """Called once by the CLI before any work: our logger on, the libraries' output off (unless `debug`)."""
    our_logger()
    if not debug:
        quiet_libraries()


@contextmanager
def library_bars_off() -> Iterator[None]:
    """diffusers' and transformers' loading and saving bars stay off: our stages time loading, and a command
    shows only its own progress (they are global switches, restored afterwards)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = [(lib, lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _ in before:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in before:
            if was:
                lib.enable_progress_bar()
