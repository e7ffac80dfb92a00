"""fast_divmod (triton_kernels/indexing.py): the multiply-high split of element indices that the
Triton BatchNorm kernels use instead of a division, exact for every 0 <= k < 2^32."""
from __future__ import annotations

import pytest
import torch

from conftest import cpu_backends

pytestmark = pytest.mark.skipif("triton" not in cpu_backends(), reason="Triton is not available here")

# Powers of two and their neighbours, odd, prime and large divisors, and the extremes.
DIVISORS = [1, 2, 3, 5, 7, 8, 9, 63, 64, 65, 100, 255, 256, 1000, 1023, 1024, 4095, 65535, 65536, 65537, 1 << 20,
            999983, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 3 * 2 ** 30, 2 ** 32 - 1]


triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from fusedtech.triton_kernels.indexing import divisor, fast_divmod, needs_wide  # noqa: E402


@triton.jit
def _divmod_kernel(k_ptr, q_ptr, r_ptr, count, d, magic, shift1, shift2, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < count
    q, r = fast_divmod(tl.load(k_ptr + offs, mask=live, other=0), d, magic, shift1, shift2, False)
    tl.store(q_ptr + offs, q, mask=live)
    tl.store(r_ptr + offs, r, mask=live)


@pytest.mark.parametrize("d", DIVISORS)
def test_fast_divmod_is_exact_below_2_pow_32(d):
    g = torch.Generator().manual_seed(d % 1000)
    top = 2 ** 32 - 1
    multiples = torch.arange(0, top // d + 1, max(1, top // d // 4000), dtype=torch.int64) * d
    k = torch.cat([torch.randint(0, 2 ** 32, (8000,), generator=g, dtype=torch.int64), multiples, multiples - 1,
                   multiples + 1, torch.tensor([0, 1, d - 1, d, 2 * d - 1, 2 ** 31 - 1, 2 ** 31, top])]).clamp(0, top)
    q, r = torch.empty_like(k), torch.empty_like(k)
    _divmod_kernel[(triton.cdiv(k.numel(), 1024),)](k, q, r, k.numel(), *divisor(d), BLOCK=1024)
    assert torch.equal(q, k // d) and torch.equal(r, k % d)


def test_divisor_range_and_wide_threshold():
    for bad in (0, 2 ** 32):
        with pytest.raises(ValueError, match="outside"):
            divisor(bad)
    assert not needs_wide(2 ** 32 - 1) and needs_wide(2 ** 32)


def test_host_grid_helpers_match_triton():
    # The launchers' cdiv / next_power_of_2 (plain Python: triton's are constexpr functions, slow on
    # the host) give triton's answers.
    from fusedtech.triton_kernels.indexing import cdiv, next_power_of_2
    for a in list(range(0, 70)) + [1023, 1024, 1025, 2 ** 31 - 1, 2 ** 31, 2 ** 40 + 3]:
        for b in (1, 2, 3, 7, 8, 128, 1024):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
        if a >= 1:
            assert next_power_of_2(a) == triton.next_power_of_2(a), a
