"""Philox-4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011) and the float32 log-uniform the EMC² sweep draws from it, in PyTorch.

These are the *reference* definitions: ``emc2_sweep.c`` (CPU) and ``_emc2_triton.py`` (CUDA,
Triton's own ``tl.philox``) evaluate the same functions inside their kernels, and
``tests/test_emc2_kernels.py`` checks all three against each other and Philox against the
Random123 known-answer vectors.

**Philox-4x32-R.** A counter (c0, c1, c2, c3) and a key (k0, k1) of 32-bit words; each of the
R = 10 rounds is

    (c0, c1, c2, c3) ← (hi(M1·c2) ⊕ c1 ⊕ k0,  lo(M1·c2),  hi(M0·c0) ⊕ c3 ⊕ k1,  lo(M0·c0))

with M0 = 0xD2511F53, M1 = 0xCD9E8D57 (hi/lo: the upper/lower 32 bits of the 64-bit product),
and the key is bumped by the Weyl constants (0x9E3779B9, 0xBB67AE85) before every round but
the first. The output is the final counter.

**Log-uniform.** From a 32-bit word x, U = ((x >> 8) + 1) · 2⁻²⁴, one of the 2²⁴ values
{2⁻²⁴, 2·2⁻²⁴, …, 1} (exact in float32, never 0), and :func:`log_uniform` is log U computed
with IEEE float32 +, −, ×, ÷ only — FreeBSD's ``logf`` (fdlibm's argument reduction
U = 2^k·(1+f), √2/2 ≤ 1+f < √2, and log(1+f) = f − (f²/2 − s(f²/2 + R(s²))), s = f/(2+f)),
without its special-case branches. So C, Triton and PyTorch get the same bits; it is checked
against numpy's float64 log on all 2²⁴ inputs (error below 2 float32 ulps). MH acceptance then
needs no exp and no library log.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
ROUNDS = 10

# FreeBSD e_logf.c (|log(1+s)-log(1-s))/s - Lg(s)| < 2^-34.24), as float32 bit patterns
_LN2_HI, _LN2_LO = 0x3F317180, 0x3717F7D1
_LG1, _LG2, _LG3, _LG4 = 0x3F2AAAAA, 0x3ECCCE13, 0x3E91E9EE, 0x3E789E26


def _f32(bits: int) -> float:
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32).item()


def philox4x32(counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[int, int],
               rounds: int = ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-``rounds`` of broadcastable int64 tensors holding 32-bit words (see the module
    docstring); returns the four output words as int64 tensors in [0, 2³²) of the broadcast shape.

    On the CPU the rounds run in NumPy on the tensors' own memory: the same int64 operations,
    with a 64-bit multiply that is ≈ 2× torch's there (5.4 against 3.3 ms at 512 × 256 counters,
    one thread); elsewhere in torch."""
    buffers = _buffers(counter)
    if buffers[0].device.type == "cpu":
        out = _rounds([b.numpy() for b in buffers], key, rounds, np.multiply, np.right_shift)
        return tuple(torch.from_numpy(w) for w in out)  # type: ignore[return-value]
    return _rounds(buffers, key, rounds, torch.mul, torch.bitwise_right_shift)


def _buffers(counter: tuple[Tensor, Tensor, Tensor, Tensor]) -> list[Tensor]:
    """The six int64 buffers of :func:`_rounds`: the counter's words broadcast (copies), then
    two scratch buffers of their shape."""
    shape = torch.broadcast_shapes(*(c.shape for c in counter))
    words = [c.expand(shape).clone() for c in counter]
    return words + [torch.empty_like(words[0]) for _ in range(2)]


def _rounds(buffers: list, key: tuple[int, int], rounds: int, multiply: Callable, right_shift: Callable) -> tuple:
    """The rounds of :func:`philox4x32` on six int64 arrays of one shape, the counter's four
    words then two scratch buffers (torch tensors with torch's ``mul`` and
    ``bitwise_right_shift``, or NumPy arrays with NumPy's), overwritten; returns the four
    output words (among the six buffers).

    int64 products of two 32-bit words wrap modulo 2⁶⁴, so ``(p >> 32) & MASK`` is the unsigned
    high word (the arithmetic shift only adds high bits the mask removes) and the low word is
    ``p`` itself, masked when it is next used (the known-answer tests check all of it)."""
    c0, c1, c2, c3, p0, p1 = buffers
    k0, k1 = key[0] & MASK32, key[1] & MASK32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        multiply(c0, M0, out=p0)  # lo0 = p0, hi0 = p0 >> 32
        multiply(c2, M1, out=p1)
        for hi, product, word, k in ((c0, p1, c1, k0), (c2, p0, c3, k1)):
            right_shift(product, 32, out=hi)
            hi ^= word
            hi ^= k
            hi &= MASK32
        c1, p1 = p1, c1  # c1 = lo1, c3 = lo0 (unmasked until used)
        c3, p0 = p0, c3
    c1 &= MASK32
    c3 &= MASK32
    return c0, c1, c2, c3


def log_uniform(bits: Tensor) -> Tensor:
    """log U for U = ((x >> 8) + 1)·2⁻²⁴ from 32-bit words x (int64 tensor), in float32 (the
    module docstring gives the formula).

    In place on six buffers of the input's size in 32-bit words: a fresh tensor per operation
    costs more than the operation at these sizes (7.5 against ≈ 2 ms at 512 × 512, one
    thread: each large temporary is a new mapping whose pages fault in). The order of every
    rounding is the formula's."""
    k = bits.to(torch.int32)  # x mod 2³² (two's complement): x >> 8 is its bits 8..31
    m = k.bitwise_right_shift_(8).bitwise_and_(0x00FFFFFF).add_(1)
    u = torch.mul(m, 2.0**-24)  # float32, exact
    ix = u.view(torch.int32)
    k = torch.bitwise_right_shift(ix, 23, out=m).sub_(127)  # m is free
    mant = ix.bitwise_and_(0x007FFFFF)  # overwrites u
    i = torch.add(mant, 0x4AFB20).bitwise_and_(0x00800000)  # set when 1.mant >= √2: use x/2
    # 1.mant, or its half when i is set: mant | (i ^ 0x3F800000), the same bits as (mant | i) ^ 0x3F800000
    f = mant.bitwise_or_(i).bitwise_xor_(0x3F800000).view(torch.float32).sub_(1.0)
    k.add_(i.bitwise_right_shift_(23))
    s = torch.add(f, 2.0, out=i.view(torch.float32))  # i is free
    torch.div(f, s, out=s)
    dk = k.to(torch.float32)
    z = torch.mul(s, s, out=k.view(torch.float32))  # k is free
    w = z * z
    t1 = torch.mul(w, _f32(_LG4)).add_(_f32(_LG2)).mul_(w)
    r = w.mul_(_f32(_LG3)).add_(_f32(_LG1)).mul_(z).add_(t1)  # t2 + t1, overwrites w
    hfsq = torch.mul(f, 0.5, out=z).mul_(f)  # z is free
    inner = r.add_(hfsq).mul_(s).add_(torch.mul(dk, _f32(_LN2_LO), out=t1))  # s·(hfsq + r) + dk·ln2_lo
    inner = torch.sub(hfsq, inner, out=hfsq).sub_(f)
    return dk.mul_(_f32(_LN2_HI)).sub_(inner)
