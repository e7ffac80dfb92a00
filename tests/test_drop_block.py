"""Fused DropBlock (torchvision.ops.drop_block2d's semantics): the block mask grown from centres drawn
with dropout's Philox generator, the same mask on every backend and bit for bit the oracle's
(fusedtech/reference/drop_block.py), in every memory format; the backward rebuilds the mask from the
saved seed (only the seed and the scale are kept); torchvision's result given the same mask; the
kernels' launches and argument errors, and the cpu kernel's scratch bounded by a tile.

No tolerances where the mask decides: masks, scales and scaled values are compared exactly; the
dropped fraction is checked against a 5-sigma binomial bound.
"""
from __future__ import annotations

import math

import pytest
import torch

import fusedtech
from fusedtech.nn import functional as F
from conftest import cpu_backends
from test_dropout import _non_finite

BACKENDS = cpu_backends()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gpu_drop_block_same_as_cpu(backend, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(8, 16, 33, 31).to(memory_format=fmt)
    dy = torch.randn_like(x)
    seed = torch.tensor([7])
    with fusedtech.use_backend("cpu"):
        cpu = _drop_block_run(x, seed, 0.05, 5, dy)
    with fusedtech.use_backend(backend):
        gpu = _drop_block_run(x.cuda(), seed.cuda(), 0.05, 5, dy.cuda())
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def test_drop_block_kernels_compile_for_sm80_sm90():
    import triton.language as tl
    from aot import compile_for_gpus
    from fusedtech.triton_kernels import drop_block as k
    compile_for_gpus(k._centres_kernel, {"seed_ptr": "*i64", "centres_ptr": "*u8", "n": "i64", "threshold": "i64"},
                     dict(BLOCK=1024))
    for planes, block in ((1, 1024), (16, 64), (1024, 1)):  # a large plane's tile; 8x8 planes; 1x1 planes
        compile_for_gpus(k._keep_kernel, {"centres_ptr": "*u8", "keep_ptr": "*u8", "counts_ptr": "*i32", "planes": "i64",
                                          "C": "i32", "H": "i32", "W": "i32", "W_m": "u32", "W_1": "i32", "W_2": "i32",
                                          "stride_n": "i64", "stride_c": "i64",
                                          "stride_h": "i64", "stride_w": "i64", "block_size": "i32",
                                          "tiles_per_plane": "i32"},
                         dict(PLANES=planes, BLOCK=block))
    compile_for_gpus(k._apply_kernel, {"x_ptr": "*bf16", "keep_ptr": "*u8", "scale_ptr": "*fp32", "y_ptr": "*bf16",
                                       "n": "i64"}, dict(DTYPE=tl.bfloat16, BLOCK=1024))
    compile_for_gpus(k._scale_kernel, {"counts_ptr": "*i32", "programs": "i32", "numel": "i64", "eps_bits": "i64",
                                       "scale_ptr": "*fp32"}, dict(BLOCK=1024))


def test_drop_block_forward_and_backward_launches(monkeypatch):
    # Triton: centres, keep (with per-program counts), one scale launch, apply; the backward
    # rebuilds the mask without counting. The scale is the oracle's to the bit (test_drop_block_every_backend_bit_identical_to_the_oracle).
    if "triton" not in BACKENDS:
        pytest.skip("the Triton backend does not run here")
    from fusedtech.triton_kernels import drop_block as k
    counts = {}
    for name in ("_centres_kernel", "_keep_kernel", "_scale_kernel", "_apply_kernel"):
        kernel = getattr(k, name)
        monkeypatch.setattr(k, name, _Counted(kernel, name, counts))
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    with fusedtech.use_backend("triton"):
        y = F.drop_block2d(x, 0.2, 3)
        assert counts == {"_centres_kernel": 1, "_keep_kernel": 1, "_scale_kernel": 1, "_apply_kernel": 1}
        y.backward(torch.ones_like(y))
    assert counts == {"_centres_kernel": 2, "_keep_kernel": 2, "_scale_kernel": 1, "_apply_kernel": 2}
    # dy = 1: dx is the scale where the forward kept, 0 elsewhere
    torch.testing.assert_close(x.grad, torch.where(y != 0, y.detach() / x.detach(), 0.0), rtol=1e-6, atol=0)


class _Counted:
    """Stands in for a Triton kernel and counts its launches by name."""

    def __init__(self, kernel, name, counts):
        self.kernel, self.name, self.counts = kernel, name, counts

    def __getitem__(self, grid):
        self.counts[self.name] = self.counts.get(self.name, 0) + 1
        return self.kernel[grid]


def test_drop_block_matches_torchvision_given_the_same_block_mask():
    tv = pytest.importorskip("torchvision.ops", reason="torchvision is optional (pip install torchvision)")
    x = torch.rand(2, 3, 12, 12) + 0.5
    torch.manual_seed(0)
    expected = tv.drop_block2d(x, p=0.3, block_size=3)
    block_mask = (expected != 0).float()  # x has no zeros: a zero output is a dropped pixel
    ours = F.drop_block2d(x, p=0.3, block_size=3, block_mask=block_mask)
    torch.testing.assert_close(ours, expected, atol=0, rtol=1e-6)


def test_drop_block_semantics():
    x = torch.rand(4, 8, 16, 16) + 0.5
    torch.manual_seed(1)
    a = F.drop_block2d(x, 0.2, 5)
    torch.manual_seed(1)
    assert torch.equal(a, F.drop_block2d(x, 0.2, 5))
    dropped = (a == 0).float().mean().item()
    assert 0.05 < dropped < 0.35  # about p once blocks overlap
    kept = a != 0
    scale = (a[kept] / x[kept]).unique()
    assert torch.allclose(scale, scale[:1].expand_as(scale), rtol=1e-5)  # one normalisation factor
    assert F.drop_block2d(x, 0.2, 5, training=False) is x
    with pytest.raises(ValueError, match="odd"):
        F.drop_block2d(x, 0.2, 4)
    m = fusedtech.nn.DropBlock2d(0.2, 3)
    assert m(x).shape == x.shape and "block_size=3" in repr(m)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_block_centres_have_probability_gamma(backend):
    # block_size 1: gamma = p and no growth, so the dropped fraction is binomial(p) within 5 sigma.
    x = torch.rand(8, 4, 32, 32) + 0.5
    p, n = 0.3, x.numel()
    with fusedtech.use_backend(backend):
        y = F.drop_block2d(x, p, 1)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n), dropped


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_block_saves_no_mask_and_backward_uses_the_forwards(backend):
    x = (torch.rand(2, 3, 12, 12) + 0.5).requires_grad_()
    dy = torch.randn(2, 3, 12, 12)
    saved = []
    with fusedtech.use_backend(backend):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            y = F.drop_block2d(x, 0.3, 3)
        (dx,) = torch.autograd.grad(y, x, dy)
    assert saved and max(saved) <= 1, saved  # the seed and the scale: nothing of the input's size
    kept = y != 0  # x has no zeros
    assert 0 < kept.float().mean() < 1
    torch.testing.assert_close(dx, dy * (y / x).detach(), rtol=1e-6, atol=0)
    assert torch.equal(dx == 0, ~kept)


def test_drop_block_gradcheck_opcheck_and_compile():
    from fusedtech.ops.drop_block import drop_block_fwd
    from fusedtech.ops.dropout import new_seed
    x = (torch.rand(2, 2, 7, 7, dtype=torch.float64) + 0.5).requires_grad_()
    seed = new_seed(x.device)
    assert torch.autograd.gradcheck(lambda t: drop_block_fwd(t, seed, 0.2, 3, 1e-6)[0], (x,))
    torch.library.opcheck(drop_block_fwd, (x.detach().float(), seed, 0.2, 3, 1e-6))
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), fusedtech.nn.DropBlock2d(0.2, 3))
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(torch.randn(2, 3, 10, 10))
    out.sum().backward()
    assert m[0].weight.grad is not None


def test_drop_block_oracle_grows_blocks_as_torchvision_does():
    # torchvision: pad the centre grid by block // 2, max-pool with padding block // 2. The oracle
    # states the same growth as a window [h - b + 1, h] x [w - b + 1, w]; same mask, given its centres.
    from fusedtech.reference.drop_block import centre_threshold, drop_block_keep
    from fusedtech.reference.dropout import dropout_draws
    x, seed, gamma = torch.rand(2, 3, 11, 9), torch.tensor([5]), 0.08
    for b in (1, 3, 5, 7):
        centres = dropout_draws(5, torch.arange(2 * 3 * (11 - b + 1) * (9 - b + 1))) < centre_threshold(gamma)
        centres = centres.view(2, 3, 11 - b + 1, 9 - b + 1).float()
        grown = torch.nn.functional.max_pool2d(torch.nn.functional.pad(centres, [b // 2] * 4), b, stride=1,
                                               padding=b // 2)
        keep, kept = drop_block_keep(x, seed, gamma, b)
        assert torch.equal(keep, grown == 0) and kept.item() == (grown == 0).sum().item()
        assert 0 < kept.item() < x.numel()


def _drop_block_run(x, seed, gamma, b, dy):
    from fusedtech.ops.drop_block import drop_block_fwd
    x = x.detach().requires_grad_()
    y, scale = drop_block_fwd(x, seed, gamma, b, 1e-6)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, scale, dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,b", [((2, 3, 7, 9), 3), ((1, 2, 5, 5), 5), ((3, 1, 11, 6), 1), ((2, 4, 12, 13), 7),
                                     ((1, 1, 1, 1), 1), ((2, 5, 33, 35), 3)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_drop_block_every_backend_bit_identical_to_the_oracle(dtype, shape, b, layout):
    from fusedtech.reference import drop_block as oracle
    x = torch.randn(shape).to(dtype)
    dy = torch.randn(shape).to(dtype)
    if layout == "channels_last":
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider tensor
        x, dy = torch.cat([x, x], 3)[..., ::2], torch.cat([dy, dy], 3)[..., ::2]
    seed, gamma = torch.tensor([1234]), 0.15
    keep, kept = oracle.drop_block_keep(x, seed, gamma, b)
    scale = (x.numel() / (1e-6 + kept.double())).float()
    for backend in BACKENDS:
        with fusedtech.use_backend(backend):
            y, got_scale, dx = _drop_block_run(x, seed, gamma, b, dy)
        assert torch.equal(got_scale, scale), backend
        assert torch.equal(y, oracle.drop_block_apply(x, keep, scale)), backend
        assert torch.equal(dx, oracle.drop_block_apply(dy, keep, scale)), backend
        if layout == "channels_last":
            assert y.is_contiguous(memory_format=torch.channels_last), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_block_gamma_edges_and_empty_tensors(backend):
    x, seed = torch.rand(2, 3, 6, 6) + 0.5, torch.tensor([3])
    with fusedtech.use_backend(backend):
        y, scale, dx = _drop_block_run(x, seed, 1.0, 3, torch.ones_like(x))  # every centre set: all dropped
        assert torch.equal(y, torch.zeros_like(x)) and torch.equal(dx, torch.zeros_like(x))
        assert scale.item() == pytest.approx(x.numel() / 1e-6)
        y, scale, dx = _drop_block_run(x, seed, 0.0, 3, torch.ones_like(x))  # no centre: x * numel / (eps + numel)
        assert torch.equal(y, x * scale) and scale.item() == pytest.approx(1.0)
        for shape in [(0, 3, 6, 6), (2, 0, 6, 6)]:
            y, scale, dx = _drop_block_run(torch.rand(shape), seed, 0.2, 3, torch.rand(shape))
            assert y.shape == shape and dx.shape == shape


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the C++ cpu extension is not built")
def test_drop_block_kernel_errors_name_the_argument():
    ops, x, seed = torch.ops.fusedtech_C, torch.randn(2, 3, 6, 6), torch.tensor([1])
    with pytest.raises(RuntimeError, match="block_size must be in"):
        ops.drop_block_keep(x, seed, 0.1, 7)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        ops.drop_block_keep(x[0], seed, 0.1, 3)
    with pytest.raises(RuntimeError, match="gamma must be in"):
        ops.drop_block_keep(x, seed, 1.5, 3)
    with pytest.raises(RuntimeError, match="seed must be"):
        ops.drop_block_keep(x, seed.float(), 0.1, 3)
    keep, _ = ops.drop_block_keep(x, seed, 0.1, 3)
    with pytest.raises(RuntimeError, match="keep must be a uint8 tensor with the input's shape and strides"):
        ops.drop_block_apply(x.contiguous(memory_format=torch.channels_last), keep, torch.tensor(1.0))
    with pytest.raises(RuntimeError, match="scale must be a float32"):
        ops.drop_block_apply(x, keep, torch.tensor(1, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="scale must be a float32"):
        ops.drop_block_apply(x, keep, torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_drop_block_low_precision_scale_does_not_overflow(dtype):
    # 2^17 kept elements: a sum in fp16 would overflow (inf) and zero the output.
    x = torch.ones(8, 16, 32, 32, dtype=dtype)
    y = F.drop_block2d(x, 0.1, 3)
    kept = (y != 0).sum().item()
    assert torch.isfinite(y).all() and kept > 0
    torch.testing.assert_close(y[y != 0].float(), torch.full((kept,), x.numel() / kept), rtol=1e-2, atol=0)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpu") if b in BACKENDS])
def test_drop_block_float64_is_exact(backend):
    # float64 in, float64 math: the scale numel / (eps + kept) is not rounded to fp32 (torchvision
    # computes it in x's dtype), so the kept values are x * scale to float64 precision.
    from fusedtech.ops.drop_block import drop_block_fwd
    from fusedtech.reference.drop_block import drop_block_keep
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    seed = torch.tensor([99], dtype=torch.int64)
    with fusedtech.use_backend(backend):
        y, scale = drop_block_fwd(x, seed, 0.1, 3, 1e-6)
    keep, kept = drop_block_keep(x, seed, 0.1, 3)
    expected_scale = x.numel() / (1e-6 + kept.double())
    assert scale.dtype == torch.float64 and y.dtype == torch.float64
    assert (scale - expected_scale).abs().item() <= 1e-15 * expected_scale.item()
    assert torch.equal(y, torch.where(keep, x * scale, 0.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_block_keeps_nan_at_dropped_positions_as_torchvision(backend):
    x = _non_finite((2, 3, 9, 9)).requires_grad_()
    dy = _non_finite((2, 3, 9, 9))
    with fusedtech.use_backend(backend):
        y = F.drop_block2d(x, 0.3, 3)
        (dx,) = torch.autograd.grad(y, x, dy)
    assert torch.isnan(y).sum() > torch.isnan(x).sum()  # dropped infinities are NaN, not 0
    assert not (y == 0).any() and not (dx == 0).any()
    # The explicit-mask path (torch's composition) agrees: both are products with the mask.
    mask = (~(torch.isnan(y) & ~torch.isnan(x))).float()
    explicit = F.drop_block2d(x.detach(), 0.3, 3, block_mask=mask)
    assert torch.equal(torch.isnan(explicit), torch.isnan(y))


# ---- DropBlock's cpu scratch: bounded by a tile, not by the plane ----------------------------------

@pytest.mark.parametrize("shape,b", [((1, 2, 259, 1030), 5), ((1, 1, 130, 2050), 7), ((2, 1, 300, 40), 11)], ids=str)
def test_drop_block_tiles_of_a_large_plane_match_the_oracle(shape, b):
    # Planes larger than one cpu tile (128 x 1024): blocks that straddle tile edges.
    if "cpu" not in BACKENDS:
        pytest.skip("cpu extension not built")
    from fusedtech.reference import drop_block as oracle
    fusedtech._backend.cpu_extension()
    x, seed, gamma = torch.randn(shape), torch.tensor([99]), 0.02
    keep, kept = oracle.drop_block_keep(x, seed, gamma, b)
    got_keep, got_kept = torch.ops.fusedtech_C.drop_block_keep(x, seed, gamma, b)
    assert torch.equal(got_keep.bool(), keep) and int(got_kept) == int(kept)


def test_drop_block_cpu_peak_memory_is_the_mask_not_seven_bytes_per_element_per_thread():
    if "cpu" not in BACKENDS:
        pytest.skip("cpu extension not built")
    import subprocess
    import sys
    code = """
import resource, torch, fusedtech
fusedtech._backend.cpu_extension()  # loads the kernels (the ops load them on first use)
torch.set_num_threads(2)
x, seed = torch.randn(1, 1, 4096, 4096), torch.tensor([5])
torch.ops.fusedtech_C.drop_block_keep(x[:, :, :64, :64].contiguous(), seed, 0.05, 7)  # first-call allocations
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
keep, kept = torch.ops.fusedtech_C.drop_block_keep(x, seed, 0.05, 7)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, keep.numel())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    grown, mask_bytes = int(out[0]), int(out[1])
    # The uint8 mask itself plus 16 MiB (allocator, tiles); the whole-plane scratch was 7 bytes per
    # element per thread (224 MiB here).
    assert grown <= mask_bytes + 16 * 2 ** 20, (grown, mask_bytes)
