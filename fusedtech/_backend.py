"""Which implementations can run here, which one an op uses, and why the others can't.

Backends: ``cuda`` (compiled CUDA kernels), ``triton`` (Triton kernels; on CPU tensors only under
TRITON_INTERPRET=1, for tests), ``cpu`` (compiled C++ kernels) and ``torch`` (the pure-PyTorch
reference). The automatic choice is the fastest one available for the tensors' device; a backend
asked for by name (``FUSEDTECH_BACKEND`` or :func:`use_backend`) that cannot run raises
:class:`BackendUnavailableError` saying why.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import warnings

import torch

BACKENDS = ("cuda", "triton", "cpu", "torch")
# Preference per device type for the automatic choice.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
# Per-op exceptions, from measurements (the one policy table: every op's choice goes through
# select()). LayerNorm/RMSNorm on an H100 (benchmarks/results/
# 2026-11-22-h100): the Triton forward kept the GPU busy for 80-105% of copy bandwidth at hidden
# 1024-16384, the CUDA C++ kernel 29-69%, so Triton goes first there.
_AUTO_ORDER_BY_OP = {("layer_norm", "cuda"): ("triton", "cuda", "torch"),
                     # The CUDA C++ BatchNorm, DropBlock, dropout+add+LayerNorm and GroupNorm kernels
                     # have not run on a GPU yet: Triton's go first.
                     ("batch_norm", "cuda"): ("triton", "cuda", "torch"),
                     ("drop_block2d", "cuda"): ("triton", "cuda", "torch"),
                     ("dropout_add_layer_norm", "cuda"): ("triton", "cuda", "torch"),
                     ("group_norm", "cuda"): ("triton", "cuda", "torch"),
                     # Nor have the 8-bit optimizer states' CUDA C++ kernels.
                     ("adam_step_quantized", "cuda"): ("triton", "cuda", "torch"),
                     ("quantize_blockwise", "cuda"): ("triton", "cuda", "torch"),
                     ("dequantize_blockwise", "cuda"): ("triton", "cuda", "torch")}
# Multi-tensor steps over large lists. Same H100 run: on GPT-2 small's list (124M fp32 elements)
# every Triton optimizer step reached 90-94% of copy bandwidth, the CUDA C++ kernels 75-84%; on
# ResNet-18's (11M elements, host-bound) neither led throughout. Lists of at least
# LARGE_LIST_ELEMENTS elements go to Triton first.
LARGE_LIST_ELEMENTS = 1 << 25
_AUTO_ORDER_LARGE_LIST = {"cuda": ("triton", "cuda", "torch")}
# The backends with float64 kernels (the Triton and CUDA C++ kernels take fp32/fp16/bf16): the
# automatic choice for a float64 input is among these (on a GPU, the reference), as torch runs
# float64 anywhere; a backend asked for by name gets the input and says it cannot.
FLOAT64_BACKENDS = ("cpu", "torch")

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("fusedtech_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run the op on these tensors."""


def _build_info() -> dict:
    path = os.path.join(os.path.dirname(__file__), "_build_info.json")
    try:
        with open(path) as f:
            return json.load(f)
    except OSError:
        return {}


@functools.lru_cache(maxsize=None)
def _load_extension(name: str):
    """Imports fusedtech.<name>; returns (module or None, reason it is missing)."""
    try:
        if name == "_C":
            from . import _C as module
        else:
            from . import _C_cuda as module
        return module, ""
    except ImportError as e:
        key = "cuda" if name == "_C_cuda" else "cpu"
        built = _build_info().get(key)
        if built and built != "built":
            return None, f"the {key} extension was not built ({built})"
        return None, f"fusedtech.{name} could not be imported ({e}); reinstall with `pip install --no-build-isolation -e .`"


def cpu_extension():
    return _load_extension("_C")[0]


def cuda_extension():
    mod, _ = _load_extension("_C")  # the CUDA module registers kernels for schemas defined in _C
    if mod is None:
        return None
    return _load_extension("_C_cuda")[0]


def _triton_importable() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"Triton is not installed ({e})"
    return True, ""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device_type: str) -> str | None:
    """None if `backend` can run on tensors of `device_type` here, else the reason."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    if backend == "torch":
        if device_type == "cuda" and not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, not {device_type} tensors"
        mod, why = _load_extension("_C")
        return None if mod is not None else why
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device_type} tensors"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible to torch"
        if cuda_extension() is None:
            return _load_extension("_C_cuda")[1] or _load_extension("_C")[1]
        return None
    # triton
    ok, why = _triton_importable()
    if not ok:
        return why
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU is visible to torch"
    if device_type == "cpu":
        if interpreting():
            return None
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before importing triton)"
    return f"Triton does not run on {device_type} tensors"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run here: for one device type, or for any device when None."""
    if device is None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        types = [torch.device(device).type]
    return [b for b in BACKENDS if any(why_unavailable(b, t) is None for t in types)]


# os.environ.get encodes its key on every call (0.7 us here), and the backend request is read on
# every op's host path: CPython's os.environ keeps an underlying dict of encoded keys and values,
# read here with the key encoded once (still live: setenv and monkeypatch write through to it).
_ENV = "FUSEDTECH_BACKEND"
_env_data = getattr(os.environ, "_data", None)
_env_key = os.environ.encodekey(_ENV) if isinstance(_env_data, dict) and hasattr(os.environ, "encodekey") else None


def _env_backend() -> str | None:
    if _env_key is None:
        return os.environ.get(_ENV)
    value = _env_data.get(_env_key)
    return None if value is None else os.environ.decodevalue(value)


# One rule for use_backend() and FUSEDTECH_BACKEND: a backend's name, or "auto", "" (and None) for
# the automatic choice.
def _checked(name: str | None, source: str) -> str:
    if not name:
        return "auto"
    if name not in BACKENDS + ("auto",):
        raise BackendUnavailableError(f"unknown backend {name!r} ({source}); choose one of "
                                      f"{', '.join(BACKENDS)}, or 'auto' / '' for the automatic choice")
    return name


def requested_backend() -> str | None:
    """The backend asked for by use_backend() or, failing that, FUSEDTECH_BACKEND (None: automatic)."""
    name = _requested.get() or _checked(_env_backend(), "FUSEDTECH_BACKEND")
    return None if name == "auto" else name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the ops inside the block on backend `name` ('auto', '' or None: the automatic choice,
    whatever FUSEDTECH_BACKEND says)."""
    token = _requested.set(_checked(name, "use_backend"))
    try:
        yield
    finally:
        _requested.reset(token)


_warned: set = set()


# Choices made, by (op, device type, implemented, large list, requested backend, availability test):
# availability is fixed for the life of a process, and the choice sits on every op's host path
# (each microsecond of Python here costs several on a GPU machine's slower CPU). The availability
# function is part of the key so that a replaced one (tests) is asked again.
_choices: dict = {}


def select(op: str, device: torch.device, implemented: tuple[str, ...], elements: int | None = None,
           float64: bool = False) -> str:
    """The backend that runs `op` on `device`, out of the backends that implement it; `elements`:
    how many elements a multi-tensor op's list holds (large lists have their own order); float64:
    the input is float64 (the automatic choice is then among FLOAT64_BACKENDS)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    wanted = requested_backend()
    large = elements is not None and elements >= LARGE_LIST_ELEMENTS
    key = (op, device_type, implemented, large, wanted, float64, why_unavailable)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _select(op, device_type, implemented, large, wanted, float64)
    return choice


def _select(op: str, device_type: str, implemented: tuple[str, ...], large: bool, wanted: str | None,
            float64: bool = False) -> str:
    if wanted is not None:
        if wanted not in implemented:
            raise BackendUnavailableError(
                f"fusedtech: backend {wanted!r} was requested but {op} has no {wanted} implementation "
                f"(it has: {', '.join(implemented)})")
        why = why_unavailable(wanted, device_type)
        if why is not None:
            raise BackendUnavailableError(f"fusedtech: backend {wanted!r} was requested for {op} but is unavailable: {why}")
        return wanted
    order = ((_AUTO_ORDER_LARGE_LIST.get(device_type) if large else None) or _AUTO_ORDER_BY_OP.get((op, device_type))
             or _AUTO_ORDER.get(device_type, ("torch",)))
    skipped = []
    for name in order:
        if name not in implemented or (float64 and name not in FLOAT64_BACKENDS):
            continue
        why = why_unavailable(name, device_type)
        if why is None:
            if skipped and (op, device_type) not in _warned:
                _warned.add((op, device_type))
                warnings.warn(f"fusedtech: {op} on {device_type} uses the {name} backend because "
                              + "; ".join(f"{b} is unavailable: {w}" for b, w in skipped), stacklevel=3)
            return name
        skipped.append((name, why))
    raise BackendUnavailableError(f"fusedtech: no backend can run {op} on {device_type} tensors")


class Implementations:
    """One op's explicit implementation table: backend name -> a function returning the
    implementation (a lazy import: Triton and the compiled extension load on first use, and
    go-to-definition on the entry lands on the kernel). `pick` chooses among the entries and caches
    the function per (device type, requested backend, large list, float64), so the choice costs one
    dict lookup per call."""

    def __init__(self, op: str, **entries):
        unknown = set(entries) - set(BACKENDS)
        if unknown:
            raise ValueError(f"{op}: unknown backends {sorted(unknown)}; the backends are {', '.join(BACKENDS)}")
        self.op, self.entries = op, entries
        self.implemented = tuple(b for b in BACKENDS if b in entries)
        self._picked: dict = {}

    def backend(self, device, elements: int | None = None, float64: bool = False) -> str:
        """The backend `pick` runs on `device` (what a report of the backends in use asks)."""
        return select(self.op, device, self.implemented, elements, float64)

    def pick(self, device, elements: int | None = None, float64: bool = False):
        wanted = _requested.get() or _env_backend() or None
        device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
        key = (device_type, wanted, elements is not None and elements >= LARGE_LIST_ELEMENTS, float64,
               why_unavailable)
        fn = self._picked.get(key)
        if fn is None:
            fn = self._picked[key] = self.entries[self.backend(device, elements, float64)]()
        return fn
