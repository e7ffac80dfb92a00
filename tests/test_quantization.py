"""Blockwise quantized optimizer states, 8-bit (dynamic maps) and FP8 (E4M3): the formats (tables,
quantize / dequantize on every backend, against bitsandbytes, torchao and torch's float8 cast) and the
Adam / AdamW built on them.

Tolerances (written down, never loosened to pass):
- quantize / dequantize: bit-exact between the oracle, the CPU kernel and Triton (interpreted here),
  and with bitsandbytes' reference (pure-PyTorch) quantizer.
- 8-bit step, kernel vs oracle: the fp32 math agrees to rounding (parameters atol 1e-6, rtol 1e-5
  in fp32; one ulp of the storage dtype plus 1e-3 / 1e-2 for fp16 / bf16, as the fp32-state tests);
  a state value that lands within rounding of a midpoint between two codes may take the other code, so
  at most 0.5% of the codes may differ, by one, and the absmax agree to rtol 1e-5.
- FP8 quantizer vs torch's float8_e4m3fn cast of x * 448 / absmax (torchao's AdamWFp8 quantizer): the
  same E4M3 value for all but 1e-4 of the elements (a value within float32 rounding of a midpoint,
  or the sign of a zero), and never more than one E4M3 step apart.
- training: 300 steps of a small regression MLP; the final loss of every 8-bit and FP8 run within 5% of
  fp32 AdamW's, and no further from it than bitsandbytes' AdamW8bit on the same run plus 1% of fp32's loss.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import fusedtech
from fusedtech import optim
from fusedtech.ops import quantization as ops
from fusedtech.reference import quantization as reference
from conftest import cpu_backends
from optim_common import _steps, assert_compiled_step_matches_eager, clone, make_params, run, set_grads

BACKENDS = cpu_backends()
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
FP32_TOL = dict(atol=1e-6, rtol=1e-5)
LOWP_TOL = {torch.float16: dict(atol=1e-3, rtol=2e-3), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}
MAX_CODE_FLIPS = 0.005

try:
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional
except Exception:  # noqa: BLE001 - absent, or present but unable to load on this machine
    bitsandbytes = None
needs_bnb = pytest.mark.skipif(bitsandbytes is None, reason="bitsandbytes is not installed")


def _awkward(n, dtype=torch.float32, seed=0):
    """n values with a wide dynamic range; blocks of zeros, a NaN block and an inf where n allows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-6, 2, max(n, 1))[:n]
    if n > 600:
        x[256:512] = 0  # an all-zero block stays zero
        x[520] = float("nan")  # its block reads back NaN
    if n > 900:
        x[800] = float("inf")
    return x.to(dtype)


def _same(a, b):
    return torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())


# Each quantized format with the signedness of its table (fp8's one table serves both moments).
TABLES = [("int8", True), ("int8", False), ("fp8", True)]
TABLE_IDS = ["int8-signed", "int8-unsigned", "fp8"]
CLASSES = {"int8": (optim.Adam8bit, optim.AdamW8bit), "fp8": (optim.AdamFp8, optim.AdamWFp8)}


def test_maps_are_sorted_with_exact_zero_and_one():
    for signed in (True, False):
        table = reference.dynamic_map(signed)
        assert table.dtype == torch.float32 and table.shape == (256,)
        assert torch.all(table[1:] > table[:-1])
        assert 0.0 in table.tolist() and table[-1].item() == 1.0
        assert (table.min().item() < -0.99) if signed else (table.min().item() == 0.0)


@needs_bnb
def test_maps_are_bitsandbytes_maps():
    assert torch.equal(reference.dynamic_map(True), bnb_functional.create_dynamic_map(signed=True))
    assert torch.equal(reference.dynamic_map(False), bnb_functional.create_dynamic_map(signed=False))


def test_fp8_table_is_e4m3s_finite_values_and_codes_name_their_bits():
    table = reference.e4m3_map()
    assert table.dtype == torch.float32 and table.shape == (256,)
    finite = table[:253]
    assert torch.all(finite[1:] > finite[:-1]) and torch.isinf(table[253:]).all()
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(finite * 448, torch.tensor(sorted(set(every[torch.isfinite(every)].tolist()))))
    bits = reference.e4m3_bits(torch.arange(253, dtype=torch.uint8))
    assert torch.equal(bits.view(torch.float8_e4m3fn).float() / 448, finite)
    assert len(set(bits.tolist())) == 253 and reference.e4m3_bits(torch.tensor([126], dtype=torch.uint8)).item() == 0


def test_fp8_quantizer_is_torchs_float8_cast_of_the_scaled_block():
    """torchao's AdamWFp8 quantizer: absmax / 448 per block of 256, then torch's cast to float8_e4m3fn."""
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 2, 1 << 20)
    codes, absmax = reference.quantize_blockwise(x, reference.e4m3_map())
    rows = x.view(-1, 256)
    theirs = (rows / (rows.abs().amax(1, keepdim=True) / 448)).view(-1).to(torch.float8_e4m3fn).float()
    ours = reference.e4m3_bits(codes).view(torch.float8_e4m3fn).float()
    assert torch.equal(absmax, rows.abs().amax(1))
    differ = ours != theirs
    assert differ.float().mean() <= 1e-4, differ.float().mean()
    finite = reference.e4m3_map()[:253] * 448
    rank = lambda v: torch.searchsorted(finite, v)  # noqa: E731
    assert (rank(ours[differ]) - rank(theirs[differ])).abs().max() <= 1 if differ.any() else True


def test_fp8_quantizer_agrees_with_torchaos():
    subclass_fp8 = pytest.importorskip("torchao.optim.subclass_fp8", reason="torchao is not installed")
    x = torch.randn(256 * 1024, generator=torch.Generator().manual_seed(2))
    their_codes, scale = subclass_fp8.quantize_fp8(x, 256)
    codes, absmax = reference.quantize_blockwise(x, reference.e4m3_map())
    torch.testing.assert_close(absmax / 448, scale, rtol=0, atol=0)
    ours = reference.e4m3_bits(codes).view(torch.float8_e4m3fn).float()
    assert (ours != their_codes.float()).float().mean() <= 1e-4


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt,signed", TABLES, ids=TABLE_IDS)
def test_quantize_and_dequantize_are_bit_exact_with_the_oracle(backend, n, dtype, fmt, signed):
    x = _awkward(n, dtype)
    if not signed:
        x = x.abs()
    table = reference.code_table(fmt, signed)
    codes, absmax = reference.quantize_blockwise(x, table)
    with fusedtech.use_backend(backend):
        got_codes, got_absmax = ops.quantize_blockwise(x, signed=signed, state_dtype=fmt)
        values = ops.dequantize_blockwise(codes, absmax, signed=signed, state_dtype=fmt)
    assert torch.equal(got_codes, codes)
    assert _same(got_absmax, absmax)
    assert _same(values, reference.dequantize_blockwise(codes, absmax, table))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("fmt,signed", TABLES, ids=TABLE_IDS)
def test_quantizer_is_exact_over_the_whole_float_range(backend, fmt, signed):
    """Every 256th float32 bit pattern in [-1, 1] (subnormals, the binades next to every midpoint, both
    signs), in blocks whose absmax is 1 so that the kernels see the values themselves: the codes of
    the CPU kernel's bucket search (and Triton's binary search) are the oracle's."""
    patterns = torch.arange(0, 2**31, 2**8 if backend == "cpu" else 2**14, dtype=torch.int64).to(torch.int32)
    values = patterns.view(torch.float32)
    values = values[values <= 1.0]
    values = torch.cat([values, -values])
    rows = values[: values.numel() // 255 * 255].view(-1, 255)
    x = torch.cat([torch.ones(rows.shape[0], 1), rows], 1).reshape(-1)
    table = reference.code_table(fmt, signed)
    with fusedtech.use_backend(backend):
        codes, _ = ops.quantize_blockwise(x, signed=signed, state_dtype=fmt)
    assert torch.equal(codes, reference.quantize_blockwise(x, table)[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_codes_follow_a_channels_last_tensor_in_memory_order(backend):
    x = _awkward(2 * 8 * 5 * 7).view(2, 8, 5, 7).contiguous(memory_format=torch.channels_last)
    with fusedtech.use_backend(backend):
        codes, absmax = ops.quantize_blockwise(x, signed=True)
        values = ops.dequantize_blockwise(codes, absmax, signed=True)
    assert codes.stride() == x.stride() and values.stride() == x.stride()
    flat_codes, flat_absmax = reference.quantize_blockwise(x.permute(0, 2, 3, 1).reshape(-1), reference.dynamic_map(True))
    assert torch.equal(codes.permute(0, 2, 3, 1).reshape(-1), flat_codes)
    assert _same(absmax, flat_absmax)


@pytest.mark.parametrize("fmt,signed", TABLES, ids=TABLE_IDS)
def test_round_trip_takes_the_nearest_code(fmt, signed):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(3))
    x = x if signed else x.abs()
    table = reference.code_table(fmt, signed)
    codes, absmax = reference.quantize_blockwise(x, table)
    values = reference.dequantize_blockwise(codes, absmax, table)
    scale = absmax.repeat_interleave(reference.BLOCK)[: x.numel()]
    # The nearest entry: no other table entry is closer to the scaled value.
    scaled = x * (1.0 / scale)
    distance = (table[None, :] - scaled[:, None]).abs()
    chosen = distance.gather(1, codes.long()[:, None]).squeeze(1)
    assert torch.all(chosen <= distance.min(dim=1).values)
    # The farthest a scaled value in [-1, 1] ([0, 1] unsigned) can be from its nearest entry: half the
    # widest gap, or the distance from -1 to the signed map's lowest entry (-0.993); fp8's +inf
    # padding is no gap.
    finite = table[torch.isfinite(table)]
    worst = max((finite[1:] - finite[:-1]).max().item() / 2, finite[0].item() - (-1.0 if signed else 0.0))
    # Plus the float32 rounding of value = entry * absmax and of the difference: two ulps of x.
    assert torch.all((values - x).abs() <= worst * scale + 2 * x.abs() * 2.0 ** -24)


@needs_bnb
def test_quantizer_is_bitsandbytes_reference_quantizer_bit_for_bit():
    x = _awkward(100_000)
    table = reference.dynamic_map(True)
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    composite = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    bnb_codes, bnb_absmax = op.redispatch(composite, x[:99_840].nan_to_num(posinf=0.0), table, 256)
    codes, absmax = reference.quantize_blockwise(x[:99_840].nan_to_num(posinf=0.0), table)
    assert torch.equal(codes, bnb_codes) and torch.equal(absmax, bnb_absmax)
    dequantized = torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, table, 256, torch.float32)
    assert torch.equal(dequantized, reference.dequantize_blockwise(codes, absmax, table))


@needs_bnb
def test_bitsandbytes_native_cpu_quantizer_is_never_nearer_than_ours():
    """bitsandbytes' compiled CPU quantizer takes a farther code for some values (measured: about 0.15%
    of normal values, up to 4 codes away); ours is the nearest (its reference quantizer's choice)."""
    x = torch.randn(102_400, generator=torch.Generator().manual_seed(1))
    table = reference.dynamic_map(True)
    codes, absmax = reference.quantize_blockwise(x, table)
    bnb_codes, bnb_absmax = torch.ops.bitsandbytes.quantize_blockwise(x, table, 256)
    assert torch.equal(absmax, bnb_absmax)
    scaled = x * (1.0 / absmax.repeat_interleave(256))
    assert torch.all((table[codes.long()] - scaled).abs() <= (table[bnb_codes.long()] - scaled).abs())


def test_quantizer_agrees_with_torchaos_but_at_ties():
    """torchao's 8-bit optimizer states use the same maps; its quantizer divides by the absmax (ours,
    bitsandbytes' rule, multiplies by its float32 reciprocal) and sends a tie up: the codes differ only
    for values within rounding of a midpoint (measured: 1 in 2^20), by one."""
    quant_utils = pytest.importorskip("torchao.optim.quant_utils", reason="torchao is not installed")
    for signed in (True, False):
        table = reference.dynamic_map(signed)
        assert torch.equal(torch.tensor(quant_utils.create_dynamic_map(signed), dtype=torch.float32), table)
        x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0))
        x = x if signed else x.abs()
        scaled, scale = quant_utils.scale_tensor(x, 256)
        theirs = quant_utils.quantize_8bit_with_qmap(scaled, table)
        ours, absmax = reference.quantize_blockwise(x, table)
        assert torch.equal(absmax, scale)
        differ = ours != theirs
        assert differ.float().mean() <= 1e-5
        assert (ours.int() - theirs.int()).abs().max() <= 1
        mids = reference.midpoints(table)
        nearest_mid = (scaled[differ][:, None] - mids[None, :]).abs().min(dim=1).values
        assert torch.all(nearest_mid <= 4 * 2.0 ** -24 * scaled[differ].abs().clamp(min=2.0 ** -126))


# --- the 8-bit optimizers ------------------------------------------------------------------------

def _dequantized(opt, p, key):
    state = opt.state[p]
    return ops.dequantize_blockwise(state[key], state[key + "_absmax"], signed=key == "exp_avg",
                                    state_dtype=opt.param_groups[0]["state_dtype"])


def _assert_close_to(ref_opt, ref_params, opt, params, tol):
    flips = total = 0
    for p_ref, p in zip(ref_params, params):
        torch.testing.assert_close(p, p_ref, **tol)
        s_ref, s = ref_opt.state[p_ref], opt.state[p]
        assert s_ref.keys() == s.keys()
        for key, value in s_ref.items():
            if value.dtype == torch.uint8:
                flips += int((value != s[key]).sum())
                total += value.numel()
                assert (value.int() - s[key].int()).abs().max() <= 1 if value.numel() else True
            else:
                torch.testing.assert_close(s[key], value, rtol=1e-5, atol=1e-12, equal_nan=True)
    assert flips <= MAX_CODE_FLIPS * max(total, 1), f"{flips} of {total} codes differ"


CONFIGS = [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True),
           dict(lr=torch.tensor(3e-3), betas=(0.8, 0.99), eps=1e-6)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("cls", [optim.Adam8bit, optim.AdamW8bit, optim.AdamFp8, optim.AdamWFp8], ids=lambda c: c.__name__)
@pytest.mark.parametrize("config", CONFIGS, ids=["default", "amsgrad-wd-max", "lr-tensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_quantized_step_matches_the_oracle(backend, cls, config, dtype):
    # min_quantized_numel=0: every tensor of the awkward list (empty, 1-element, transposed, strided,
    # a partial last block) is quantized.
    params = make_params(dtype)
    ref_params = clone(params)
    ref = run(cls, ref_params, backend="torch", min_quantized_numel=0, **copy.deepcopy(config))
    fused = run(cls, params, backend=backend, min_quantized_numel=0, **copy.deepcopy(config))
    _assert_close_to(ref, ref_params, fused, params, FP32_TOL if dtype == torch.float32 else LOWP_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_oracle_is_the_fp32_step_between_dequantize_and_quantize(backend, fmt):
    """One step from given codes equals: dequantize, torch.optim.AdamW's step in fp32, quantize."""
    p = torch.nn.Parameter(torch.randn(3000, generator=torch.Generator().manual_seed(5)))
    opt = CLASSES[fmt][1]([p], lr=1e-2, min_quantized_numel=0)
    _steps(opt, [p], 3, backend)
    p_torch = torch.nn.Parameter(p.detach().clone())
    t_opt = torch.optim.AdamW([p_torch], lr=1e-2, foreach=False)
    t_opt.load_state_dict(optim.dequantize_state_dict(opt.state_dict()))
    _steps(opt, [p], 1, backend, start=3)
    _steps(t_opt, [p_torch], 1, start=3)
    torch.testing.assert_close(p, p_torch, **FP32_TOL)
    for key in ("exp_avg", "exp_avg_sq"):
        codes, absmax = reference.quantize_blockwise(t_opt.state[p_torch][key], reference.code_table(fmt, key == "exp_avg"))
        assert (codes.int() - opt.state[p][key].int()).abs().max() <= 1
        assert (codes != opt.state[p][key]).float().mean() <= MAX_CODE_FLIPS
        torch.testing.assert_close(opt.state[p][key + "_absmax"], absmax, rtol=1e-5, atol=0)


def test_small_tensors_keep_torch_states_and_large_ones_are_quantized():
    small, large = torch.nn.Parameter(torch.randn(4095)), torch.nn.Parameter(torch.randn(64, 64))
    opt = optim.AdamW8bit([small, large])
    small.grad, large.grad = torch.randn_like(small), torch.randn_like(large)
    opt.step()
    assert set(opt.state[small]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[small]["exp_avg"].dtype == torch.float32
    st = opt.state[large]
    assert set(st) == {"step", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax"}
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg"].shape == large.shape
    assert st["exp_avg_absmax"].dtype == torch.float32 and st["exp_avg_absmax"].shape == (16,)
    assert opt.param_groups[0]["state_dtype"] == "int8" and opt.param_groups[0]["min_quantized_numel"] == 4096


@pytest.mark.parametrize("cls", [optim.AdamW8bit, optim.AdamWFp8], ids=lambda c: c.__name__)
def test_state_bytes_per_parameter_are_about_two(cls):
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 10))
    opt = cls(model.parameters())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    assert state_bytes / n <= 2.1, state_bytes / n


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_parameter_keeps_its_layout_in_the_codes(backend):
    w = torch.nn.Parameter(torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last))
    w_ref = torch.nn.Parameter(w.detach().contiguous())
    for p in (w, w_ref):
        opt = optim.AdamW8bit([p], lr=1e-2, min_quantized_numel=0)
        for s in range(3):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(s)).to(memory_format=torch.channels_last
                                                                                          if p is w else torch.contiguous_format)
            with fusedtech.use_backend(backend):
                opt.step()
        if p is w:
            assert opt.state[w]["exp_avg"].stride() == w.stride()
            values = _dequantized(opt, w, "exp_avg")
        else:
            values_contiguous = _dequantized(opt, w_ref, "exp_avg")
    assert values.shape == values_contiguous.shape  # blocks differ (memory order), the values stay close
    torch.testing.assert_close(w, w_ref, atol=1e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler_skip_changes_neither_codes_nor_scales(backend):
    params = make_params()
    opt = run(optim.AdamW8bit, params, steps=3, backend=backend, min_quantized_numel=0)
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in params]
    set_grads(params, 9)
    opt.grad_scale = torch.tensor(1024.0)
    opt.found_inf = torch.tensor(1.0)
    with fusedtech.use_backend(backend):
        opt.step()
    del opt.grad_scale, opt.found_inf
    after = opt.state_dict()
    for p, w in zip(params, weights):
        assert torch.equal(p.detach(), w)
    for pid, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][pid][key], value), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [optim.AdamW8bit, optim.AdamWFp8], ids=lambda c: c.__name__)
def test_nan_gradient_makes_its_block_nan_never_zero(backend, cls):
    p = torch.nn.Parameter(torch.randn(1024))
    opt = cls([p], lr=1e-2, min_quantized_numel=0)
    _steps(opt, [p], 2, backend)
    p.grad = torch.randn_like(p)
    p.grad[300] = float("nan")
    with fusedtech.use_backend(backend):
        opt.step()
    m = _dequantized(opt, p, "exp_avg")
    assert torch.isnan(m[256:512]).all() and torch.isfinite(m[:256]).all() and torch.isfinite(m[512:]).all()
    assert torch.isnan(opt.state[p]["exp_avg_sq_absmax"][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [optim.AdamW8bit, optim.AdamWFp8], ids=lambda c: c.__name__)
def test_quantized_state_dict_round_trip_continues_bit_identically(backend, cls):
    params = make_params()
    opt = run(cls, params, steps=4, backend=backend, lr=1e-2, min_quantized_numel=0, amsgrad=True)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    resumed_params = clone(params)
    resumed = cls(resumed_params, lr=1e-2, min_quantized_numel=0, amsgrad=True)
    resumed.load_state_dict(loaded)
    assert resumed.state[resumed_params[1]]["exp_avg"].dtype == torch.uint8
    _steps(opt, params, 4, backend, start=4)
    _steps(resumed, resumed_params, 4, backend, start=4)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
        for key, value in opt.state[a].items():
            assert torch.equal(resumed.state[b][key], value), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_torch_checkpoint_loads_into_quantized_states(backend, dtype, fmt):
    params = make_params(dtype)
    t_opt = run(torch.optim.AdamW, params, steps=4, lr=1e-2, foreach=False)
    ours = clone(params)
    opt = CLASSES[fmt][1](ours, lr=1e-2, min_quantized_numel=0)
    opt.load_state_dict(copy.deepcopy(t_opt.state_dict()))
    # A step GradScaler skips: the loaded states are converted and nothing else changes.
    for q in ours:
        q.grad = torch.zeros_like(q)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    with fusedtech.use_backend(backend):
        opt.step()
    del opt.grad_scale, opt.found_inf
    for p, q in zip(params, ours):
        assert torch.equal(q, p)
        for key in ("exp_avg", "exp_avg_sq"):
            codes, absmax = reference.quantize_blockwise(t_opt.state[p][key], reference.code_table(fmt, key == "exp_avg"))
            assert torch.equal(opt.state[q][key], codes) and torch.equal(opt.state[q][key + "_absmax"], absmax)
        assert opt.state[q]["step"].item() == t_opt.state[p]["step"].item()
    _steps(opt, ours, 2, backend, start=4)
    assert all(torch.isfinite(q).all() for q in ours)


@pytest.mark.parametrize("cls", [optim.AdamW8bit, optim.AdamWFp8], ids=lambda c: c.__name__)
def test_dequantized_checkpoint_loads_into_torch_optim(cls):
    params = make_params()
    opt = run(cls, params, steps=4, lr=1e-2, min_quantized_numel=0)
    sd = optim.dequantize_state_dict(opt.state_dict())
    torch_params = clone(params)
    t_opt = torch.optim.AdamW(torch_params, lr=1e-2, foreach=False)
    t_opt.load_state_dict(sd)
    assert t_opt.state_dict()["param_groups"][0].keys() == torch.optim.AdamW(clone(params)).state_dict()["param_groups"][0].keys()
    for p, q in zip(params, torch_params):
        state = t_opt.state[q]
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
        assert torch.equal(state["exp_avg"], _dequantized(opt, p, "exp_avg"))
    _steps(t_opt, torch_params, 2, start=4)  # and torch steps from it


@needs_bnb
@pytest.mark.parametrize("cls,bnb_name", [(optim.AdamW8bit, "AdamW8bit"), (optim.Adam8bit, "Adam8bit")])
def test_bitsandbytes_checkpoint_loads_and_continues(cls, bnb_name):
    """A bitsandbytes 8-bit checkpoint (through torch.save / torch.load) loads: its codes and absmax
    become ours unchanged (same layout, same maps), its 32-bit states of small tensors become torch's,
    and a step from it lands where bitsandbytes' own next step does (its update differs from ours by
    float32 rounding: m = beta1 m + (1 - beta1) g where ours is torch's lerp)."""
    torch.manual_seed(0)
    shapes = [(64, 100), (300,), (33, 257)]
    theirs = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    # No weight decay: bitsandbytes' Adam8bit decays decoupled (as AdamW) where torch's Adam adds it to the gradient.
    bnb_opt = getattr(bitsandbytes.optim, bnb_name)(theirs, lr=1e-3, weight_decay=0.0)
    for s in range(3):
        set_grads(theirs, s, none_every=1000)
        bnb_opt.step()
    buf = io.BytesIO()
    torch.save(bnb_opt.state_dict(), buf)
    buf.seek(0)
    ours = clone(theirs)
    opt = cls(ours, lr=1e-3, weight_decay=0.0)
    opt.load_state_dict(torch.load(buf, weights_only=False))
    for p, q in zip(theirs, ours):
        bnb_state, state = bnb_opt.state[p], opt.state[q]
        assert state["step"].item() == bnb_state["step"]
        if bnb_state["state1"].dtype == torch.uint8:
            assert torch.equal(state["exp_avg"], bnb_state["state1"]) and torch.equal(state["exp_avg_absmax"], bnb_state["absmax1"])
            assert torch.equal(state["exp_avg_sq"], bnb_state["state2"])
        else:
            assert state["exp_avg"].dtype == torch.float32 and torch.equal(state["exp_avg"], bnb_state["state1"])
    set_grads(theirs, 3, none_every=1000)
    set_grads(ours, 3, none_every=1000)
    bnb_opt.step()
    opt.step()
    for p, q in zip(theirs, ours):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("source,target", [(optim.AdamW8bit, optim.AdamWFp8), (optim.AdamWFp8, optim.AdamW8bit)],
                         ids=["int8-to-fp8", "fp8-to-int8"])
def test_a_checkpoint_of_one_format_loads_into_the_other_as_its_values(source, target):
    """The codes of one format mean nothing in the other: they are dequantized with the saved format's
    table (the saved param groups name it) and quantized again in the loading optimizer's."""
    params = make_params()
    src = run(source, params, steps=3, lr=1e-2, min_quantized_numel=0)
    ours = clone(params)
    opt = target(ours, lr=1e-2, min_quantized_numel=0)
    opt.load_state_dict(copy.deepcopy(src.state_dict()))
    fmt = opt.param_groups[0]["state_dtype"]
    assert fmt == target(clone(params)).param_groups[0]["state_dtype"]
    # A step GradScaler skips: the loaded states are converted and nothing else changes.
    for q in ours:
        q.grad = torch.zeros_like(q)
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)
    opt.step()
    del opt.grad_scale, opt.found_inf
    for p, q in zip(params, ours):
        assert torch.equal(q, p)
        for key in ("exp_avg", "exp_avg_sq"):
            codes, absmax = reference.quantize_blockwise(_dequantized(src, p, key), reference.code_table(fmt, key == "exp_avg"))
            assert torch.equal(opt.state[q][key], codes) and torch.equal(opt.state[q][key + "_absmax"], absmax)
    _steps(opt, ours, 2, start=3)
    assert all(torch.isfinite(q).all() for q in ours)


def test_8bit_checkpoint_loads_into_a_full_precision_optimizer():
    params = make_params()
    q_opt = run(optim.AdamW8bit, params, steps=3, lr=1e-2, min_quantized_numel=0)
    full_params = clone(params)
    full = optim.AdamW(full_params, lr=1e-2)
    full.load_state_dict(copy.deepcopy(q_opt.state_dict()))
    for p, q in zip(params, full_params):
        if p.numel():
            assert set(full.state[q]) == {"step", "exp_avg", "exp_avg_sq"}
            assert torch.equal(full.state[q]["exp_avg"], _dequantized(q_opt, p, "exp_avg"))
    _steps(full, full_params, 2, start=3)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_state_dtype_keyword_on_adam_equals_the_quantized_class(fmt):
    p1, p2 = make_params(), make_params()
    a = run(optim.AdamW, p1, steps=3, lr=1e-2, state_dtype=fmt, min_quantized_numel=0)
    b = run(CLASSES[fmt][1], p2, steps=3, lr=1e-2, min_quantized_numel=0)
    for x, y in zip(p1, p2):
        assert torch.equal(x, y)
        for key, value in a.state[x].items():
            assert torch.equal(b.state[y][key], value)


def test_unknown_state_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="state_dtype"):
        optim.AdamW(make_params(), state_dtype="int3")
    with pytest.raises(ValueError, match="min_quantized_numel"):
        optim.AdamW8bit(make_params(), min_quantized_numel=-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_8bit_states_with_master_weights(dtype):
    params = make_params(dtype)
    ref_params = clone(params)
    ref = run(optim.AdamW8bit, ref_params, backend="torch", lr=1e-2, min_quantized_numel=0, master_weights=True)
    fused = run(optim.AdamW8bit, params, lr=1e-2, min_quantized_numel=0, master_weights=True)
    _assert_close_to(ref, ref_params, fused, params, LOWP_TOL[dtype])
    assert fused.state[params[1]]["master_param"].dtype == torch.float32


def test_compiled_8bit_step_matches_eager():
    assert_compiled_step_matches_eager(lambda ps: optim.AdamW8bit(ps, lr=1e-2, min_quantized_numel=0))


def test_8bit_step_op_passes_opcheck():
    params = [torch.randn(300), torch.randn(17, 33)]
    grads = [torch.randn_like(p) for p in params]
    quantized = [ops.quantize_blockwise(torch.zeros_like(p), signed=s) for s in (True, False) for p in params]
    m, ma = [q[0] for q in quantized[:2]], [q[1] for q in quantized[:2]]
    v, va = [q[0] for q in quantized[2:]], [q[1] for q in quantized[2:]]
    steps = [torch.ones((), dtype=torch.float32) for _ in params]
    args = (params, grads, m, ma, v, va, [], [], [], steps, ops.table(True, "cpu"), ops.table(False, "cpu"),
            1e-2, None, 0.9, 0.999, 1e-8, 0.01, True, False, False, None, None)
    torch.library.opcheck(torch.ops.fusedtech.adam_step_quantized_.default, args)


def _train(make_optimizer, steps=300):
    """Held-out loss after full-batch training of a small MLP on a noisy regression (the noise floor is
    0.09: held out, the loss cannot fall towards 0 by memorising, so runs compare on what they learnt)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 64, generator=g)
    y = torch.sin(x[:, :8].sum(1, keepdim=True) / 2) + 0.3 * torch.randn(8192, 1, generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(),
                                torch.nn.Linear(128, 1))
    opt = make_optimizer(model.parameters())
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x[:4096]), y[:4096])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(x[4096:]), y[4096:]).item()


@needs_bnb
def test_300_steps_of_quantized_training_end_as_close_to_fp32_adamw_as_bitsandbytes():
    fp32 = _train(lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    theirs = _train(lambda ps: bitsandbytes.optim.AdamW8bit(ps, lr=3e-3))
    for cls in (optim.AdamW8bit, optim.AdamWFp8):
        ours = _train(lambda ps: cls(ps, lr=3e-3))
        assert abs(ours - fp32) <= 0.05 * fp32, (cls.__name__, ours, fp32)
        assert abs(ours - fp32) <= abs(theirs - fp32) + 0.01 * fp32, (cls.__name__, ours, theirs, fp32)


def test_300_steps_of_quantized_training_end_within_5_percent_of_fp32():
    fp32 = _train(lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    for make in (lambda ps: optim.AdamW8bit(ps, lr=3e-3), lambda ps: optim.Adam8bit(ps, lr=3e-3, amsgrad=True),
                 lambda ps: optim.AdamWFp8(ps, lr=3e-3), lambda ps: optim.AdamFp8(ps, lr=3e-3, amsgrad=True)):
        loss = _train(make)
        assert abs(loss - fp32) <= 0.05 * fp32, (loss, fp32)



@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS[:2], ids=["default", "amsgrad-wd-max"])
@pytest.mark.parametrize("cls", [optim.AdamW8bit, optim.AdamWFp8], ids=lambda c: c.__name__)
def test_gpu_quantized_step_matches_the_oracle(backend, dtype, config, cls):
    params = [torch.nn.Parameter(p.detach().cuda()) for p in make_params(dtype)]
    ref_params = clone(params)
    ref = run(cls, ref_params, backend="torch", min_quantized_numel=0, **copy.deepcopy(config))
    fused = run(cls, params, backend=backend, min_quantized_numel=0, **copy.deepcopy(config))
    _assert_close_to(ref, ref_params, fused, params, FP32_TOL if dtype == torch.float32 else LOWP_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("n", [1, 257, 4097, 100_000])
def test_gpu_quantize_is_bit_exact_with_the_oracle(backend, n):
    x = _awkward(n)
    for fmt, signed in TABLES:
        table = reference.code_table(fmt, signed)
        codes, absmax = reference.quantize_blockwise(x if signed else x.abs(), table)
        with fusedtech.use_backend(backend):
            got_codes, got_absmax = ops.quantize_blockwise((x if signed else x.abs()).cuda(), signed=signed, state_dtype=fmt)
            values = ops.dequantize_blockwise(codes.cuda(), absmax.cuda(), signed=signed, state_dtype=fmt)
        assert torch.equal(got_codes.cpu(), codes) and _same(got_absmax.cpu(), absmax)
        assert _same(values.cpu(), reference.dequantize_blockwise(codes, absmax, table))


@pytest.mark.gpu
def test_gpu_8bit_step_is_captured_in_a_cuda_graph():
    params = [torch.nn.Parameter(torch.randn(5000, device="cuda")) for _ in range(3)]
    opt = optim.AdamW8bit(params, lr=torch.tensor(1e-2, device="cuda"), min_quantized_numel=0)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state made outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    before = [p.detach().clone() for p in params]
    graph.replay()
    torch.cuda.synchronize()
    assert all(not torch.equal(p, b) for p, b in zip(params, before))
