"""What a refusal of forward-mode AD (or of ``vmap``) looks like, and the op and line of the model it came from,
for the messages of the fallbacks."""

from __future__ import annotations

import linecache
import os

import torch

# Messages of errors that mean "this op or function has no forward-mode (or vmap) rule".
_UNSUPPORTED_MARKERS = (
    "forward ad",
    "forward-mode",
    "forward mode",
    "setup_context",
    "jvp",
    "batching rule",
    "vmap",
    "functorch",
    "doesn't have storage",  # a kernel that reads a data pointer, under vmap (a packed sequence through nn.GRU)
)


#: Code of these packages is never "the line of the model that called the op" in messages.
_LIBRARY_ROOTS = (os.path.dirname(torch.__file__ or "") + os.sep, os.path.dirname(__file__) + os.sep)


def culprit(error: BaseException) -> str:
    """The op that refused, as precisely as the error tells: torch's message, the custom ``autograd.Function``
    it came from, and the line of the model's code that called it."""
    text = str(error).strip().splitlines()
    parts = [text[0] if text else type(error).__name__]
    function, site = None, None
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        cls = frame.f_locals.get("cls") if frame.f_code.co_name == "apply" else None
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
            function = cls
        filename = frame.f_code.co_filename
        if not any(filename.startswith(root) for root in _LIBRARY_ROOTS):
            site = f"{filename}:{tb.tb_lineno}"
            line = linecache.getline(filename, tb.tb_lineno).strip()
            site = f"`{line}` ({site})" if line else site
        tb = tb.tb_next
    if function is not None:
        parts.append(f"custom autograd.Function {function.__module__}.{function.__qualname__}")
    if site is not None:
        parts.append(f"called at {site}")
    return "; ".join(parts)


def raised_in_backward(error: BaseException) -> bool:
    """Whether ``error`` was raised inside a backward pass (``torch.autograd.grad`` or ``backward``), as one the
    model runs inside ``forward`` (forces from an energy) fails under ``vmap``."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_engine_run_backward":
            return True
        tb = tb.tb_next
    return False


def is_unsupported(error: BaseException) -> bool:
    if isinstance(error, NotImplementedError):
        return True
    message = str(error).lower()
    return any(marker in message for marker in _UNSUPPORTED_MARKERS)
