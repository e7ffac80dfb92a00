"""Optimizer step: one full step over a real model's parameter list, each implementation.

Bytes moved per step for Adam/AdamW in fp32: 28 per parameter (read param, grad, exp_avg,
exp_avg_sq: 16; write param, exp_avg, exp_avg_sq: 12). GB/s = bytes / time; the copy case moves
the same bytes (half read, half written) with one device copy.
"""
from __future__ import annotations

import pytest
import torch

import fusedtech
from benchmarks import _common
from benchmarks.param_shapes import cases, make_params

DEV = _common.device()
CASES = cases(DEV)
BYTES_PER_PARAM = {"Adam": 28, "AdamW": 28}


def _deepspeed_cpu_adam():
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam
    except Exception:  # noqa: BLE001 - any import/JIT-build failure means "not available here"
        return None


def implementations(opt_name: str):
    """(impl name, factory(params) -> optimizer, backend or None) that can run on this device."""
    torch_cls = getattr(torch.optim, opt_name)
    fused_cls = getattr(fusedtech.optim, opt_name)
    impls = [
        ("torch-forloop", lambda ps: torch_cls(ps, lr=1e-3, foreach=False), None),
        ("torch-foreach", lambda ps: torch_cls(ps, lr=1e-3, foreach=True), None),
        ("torch-fused", lambda ps: torch_cls(ps, lr=1e-3, fused=True), None),
    ]
    for backend in fusedtech.available_backends(DEV):
        if backend == "torch" or (backend == "triton" and DEV.type == "cpu"):
            continue  # the reference and the interpreter are for testing, not timing
        impls.append((f"fusedtech-{backend}", lambda ps: fused_cls(ps, lr=1e-3), backend))
    ds = _deepspeed_cpu_adam()
    if ds is not None and DEV.type == "cpu":
        impls.append(("deepspeed-cpu-adam",
                      lambda ps: ds(ps, lr=1e-3, adamw_mode=(opt_name == "AdamW"), fp32_optimizer_states=True), None))
    return impls


PARAMS = [(opt, case, name) for opt in BYTES_PER_PARAM for case in CASES for name, _, _ in implementations(opt)]


@pytest.mark.parametrize("opt_name,case,impl", PARAMS, ids=["-".join(p) for p in PARAMS])
def test_optimizer_step(benchmark, opt_name, case, impl):
    _, factory, backend = next(i for i in implementations(opt_name) if i[0] == impl)
    params = make_params(CASES[case], DEV)
    numel = sum(p.numel() for p in params)
    opt = factory(params)

    def step():
        with fusedtech.use_backend(backend):
            opt.step()

    _common.measure(benchmark, step, dev=DEV, op=f"{opt_name}.step", impl=impl, case=case, dtype=torch.float32,
                    bytes_moved=BYTES_PER_PARAM[opt_name] * numel, params=numel, tensors=len(params))


@pytest.mark.parametrize("case", list(CASES))
def test_copy(benchmark, case):
    numel = sum(torch.Size(s).numel() for s in CASES[case])
    nbytes = BYTES_PER_PARAM["Adam"] * numel
    _common.measure(benchmark, _common.copy_fn(nbytes, DEV), dev=DEV, op="copy", impl="copy", case=case,
                    dtype=torch.float32, bytes_moved=nbytes, params=numel)
