"""fp32 -> storage dtype conversion with round-to-nearest-even, identical on the GPU and under the
interpreter. (Triton 3.8's interpreter converts fp32 to bf16 by truncation, even when asked for
"rtne", which biases every stored optimizer state and parameter toward zero; the GPU rounds to
nearest even. Doing the rounding with integer ops gives one behaviour everywhere, at the cost of
a few integer instructions in kernels that are bound by memory bandwidth.)"""
import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """Cast fp32 x to DTYPE (float32, float16 or bfloat16) rounding to nearest even."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # Add 0x7FFF plus the lowest kept bit, then drop the low 16 bits: ties go to even.
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # NaN: keep it a quiet NaN (rounding could carry its payload into the exponent).
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def stochastic_round_draws(seed, offs, step, tensor):
    """uint32 draws for bf16 stochastic rounding (fusedtech/reference/rounding.py): element offs of
    tensor `tensor` at `step` takes word offs % 4 of the Philox block (seed; offs // 4, step, tensor)."""
    counter = offs // 4
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = (counter >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + step.to(tl.uint32)
    c3 = tl.zeros_like(c0) + tensor.to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    w = offs % 4
    r = tl.where(w == 0, r0, tl.where(w == 1, r1, tl.where(w == 2, r2, r3)))
    return r.to(tl.uint32, bitcast=True)


@triton.jit
def round_bf16_stochastic(x, draw):
    """fp32 x to bf16 with the draw's top 16 bits added below the kept ones, then truncated (unbiased);
    NaN stays a quiet NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (draw >> 16)) >> 16
    rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
