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
