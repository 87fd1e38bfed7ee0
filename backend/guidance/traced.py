"""A frozen network's call traced with TorchScript, once per input signature.

The embedded prior's UNet is small: at 32x32 most of its time on the CPU went to Python and
operator dispatch (diffusers' blocks issue some 300 operators a call), not arithmetic. The
trace replays the same operators without the Python around them: the outputs are bit-identical
and a call takes a fifth to a quarter less time (bench/sds_speed.py's guidance figure, and
the UNet alone). Measured and not taken:
torch.compile (17 % faster, but 40 s to compile, most of an object's run) and torch.export's
module (no faster than eager: it still runs each operator from Python).

torch 2.13 deprecates `torch.jit.trace`; where a torch cannot trace, the call stays eager."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

Fn = Callable[..., torch.Tensor]


class Traced:
    """Calls `fn` through a trace of itself made for the arguments' shapes, dtypes and devices.

    Only for frozen weights (they become constants of the trace) and without autograd: a trace
    replays the operators of the shapes it saw (diffusers branches on shapes in Python, hence
    one trace per signature), and with autograd on `fn` runs as it is."""

    def __init__(self, fn: Fn) -> None:
        self.fn = fn
        self.traces: dict[tuple, Fn] = {}

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self.fn(*args)
        key = tuple((a.shape, a.dtype, a.device, a.is_contiguous(memory_format=torch.channels_last)) for a in args)
        traced = self.traces.get(key)
        if traced is None:
            traced = self.traces[key] = _trace(self.fn, args) or self.fn
        with torch.jit.optimized_execution(False):  # the plain executor: as fast here, with no profiling runs first
            return traced(*args)


def _trace(fn: Fn, args: tuple[torch.Tensor, ...]) -> Fn | None:
    try:
        with warnings.catch_warnings():  # shape branches (fixed by the key) and TorchScript's deprecation
            warnings.simplefilter("ignore")
            # through a lambda: a module's bound method is not traceable as a function
            return torch.jit.trace(lambda *a: fn(*a), args, check_trace=False)
    except Exception as exc:  # noqa: BLE001 - the eager call is always right, only slower
        log.warning("running untraced, %s: %s", type(exc).__name__, exc)
        return None
