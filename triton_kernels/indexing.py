"""Division of element indices by a size known only at launch, without a hardware division per
element: a runtime integer division is a long emulated routine on NVIDIA GPUs (tens of
instructions, more for 64-bit), and an elementwise kernel over an (N, C, S) view divides every
index by S and C, where a memory-bound kernel has a budget of a few tens of instructions per
element in all. Round-up multiply-high division (Granlund & Montgomery; libdivide's branch-free
unsigned form): exact for 0 <= k < 2^32; WIDE kernels (larger tensors) divide plainly."""
import functools

import triton
import triton.language as tl


@functools.lru_cache(maxsize=4096)  # on every launch's host path; the sizes of a model repeat every step
def divisor(d: int) -> tuple[int, int, int, int]:
    """(d, magic, shift1, shift2) for fast_divmod, for 1 <= d < 2^32."""
    if not 1 <= d < 2 ** 32:
        raise ValueError(f"fusedtech: divisor {d} is outside [1, 2^32)")
    log2_ceil = (d - 1).bit_length()
    magic = (((1 << log2_ceil) - d) << 32) // d + 1  # 2^32 + magic = floor(2^(32 + l) / d) + 1
    return d, magic, min(log2_ceil, 1), max(log2_ceil - 1, 0)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids. triton.cdiv is a constexpr function (so in Triton 3.6 and 3.8): 1.6 us
    a call on the host, which unwraps constexpr arguments, against 0.02 us here, on every launch's path."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1), without triton.next_power_of_2's host cost (see cdiv)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def needs_wide(count: int) -> bool:
    """True if indices up to count may reach 2^32, where fast_divmod's 32-bit form stops being exact."""
    return count >= 2 ** 32


@triton.jit
def fast_divmod(k, d, magic, shift1, shift2, WIDE: tl.constexpr):
    """(k // d, k % d) as int64 for int64 indices 0 <= k; (d, magic, shift1, shift2) from divisor()."""
    if WIDE:
        q = k // d
    else:
        # tl.cast, not .to: Triton's JIT passes an integer argument equal to 1 as a constexpr (a
        # Python int, which has no .to), and shift1 is 1 for every d >= 2, magic for powers of two.
        n = k.to(tl.uint32)
        t = tl.umulhi(n, tl.cast(magic, tl.uint32))
        q = ((t + ((n - t) >> tl.cast(shift1, tl.uint32))) >> tl.cast(shift2, tl.uint32)).to(tl.int64)
    return q, k - q * d
