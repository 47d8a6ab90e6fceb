r"""mamba-ssm's selective scan as compiled CPU kernels (numba): the default CPU scan.

:func:`prot_lib.models.selective_scan.selective_scan` (and so :class:`prot_lib.models.Mamba`) runs
:func:`numba_scan` for CPU tensors when numba imports, else the pure-PyTorch chunked scan of
:mod:`prot_lib.models.chunked_scan`; ``PROT_LIB_SCAN=torch`` forces the latter. The kernels compute
the whole contract of mamba-ssm's ``selective_scan_ref`` on float32 tensors: delta + delta_bias,
softplus, the recurrence, + D u, * silu(z), and the gradients of all of it;
:mod:`prot_lib.models.selective_scan` checks shapes, casts to float32 and back, and routes
time-invariant (2-D) B and C to the reference loop.

The recurrence (Gu & Dao 2023, "Mamba", Algorithm 2 with eq. 2a and 4, as mamba-ssm's
``selective_scan_ref`` computes it), per batch element b, channel d and state n:

    h_t = exp(Delta_t A) * h_{t-1} + (Delta_t B_t) u_t,   h_0 = 0,     y_t = sum_n C_{t,n} h_{t,n}

and its adjoint, derived in :mod:`prot_lib.models.chunked_scan` (G_t = dl/dh_t, P_t = dl/d(Delta_t A)):

    G_t = C_t dl/dy_t + exp(Delta_{t+1} A) G_{t+1},    P_t = (G_t h_{t-1}) exp(Delta_t A)
    dl/dDelta_t = sum_n A P_t + sum_n B_t (G_t u_t),   dl/du_t = sum_n G_t (Delta_t B_t)
    dl/dA = sum_{b,t} Delta_t P_t,   dl/dB_t = sum_d Delta_t (G_t u_t),   dl/dC_t = sum_d dl/dy_t h_t

Why compiled kernels, and why numba (numbers: benchmarks/README.md, from benchmarks/bench_scan.py)
------------------------------------------------------------------------------------------------
A state update is one exp, three multiplies and two adds: about a nanosecond of work that no
sequence of torch ops can do without writing every intermediate to memory (issue 13 measured that
the chunked torch scan spends about three quarters of its time on copies and small ops), and
``torch.profiler`` on the issue's cell (batch 16, d_inner 64, d_state 16, L 512, forward and
backward, one thread) showed the contract's elementwise ops around the recurrence (softplus and its
backward above all) costing a large share of a compiled scan's time when run as torch ops. Here one
loop nest does the update with the state in L1 cache, vectorised over channels (8 float32 lanes of
AVX2), and the contract's ops run in the same loops, so the time is the cost of the exps and
multiply-adds themselves. Weighed and measured:

* numba (chosen): wheels on PyPI for every platform, LLVM inside, so the install stays
  ``pip install`` and nothing is compiled on the user's machine but the JIT's own code (cached).
* torch's exp (SLEEF) for a chunk of Delta A, with a kernel running only the multiply-adds: torch's
  exp alone timed slower per element than the exp below (interactive timing, same process), and
  every exp(Delta A) would round-trip through memory; rejected.
* a C++ extension (``torch.utils.cpp_extension``, ``at::vec`` exp): the same loop at best, but it
  needs a C++ compiler and torch's headers on the user's machine at run time, and a fallback where
  they are missing; numba gives the same code without that. Not built.
* a better vectorised PyTorch formulation: every closed form (cumulative products, log space)
  divides by decays and breaks in float32 (see :mod:`.chunked_scan`); the exact streamed form is
  what the chunked scan already is, bound by op overhead. It stays as the fallback.

The kernels
-----------
* forward: for each work item (a batch element, or a block of its channels), t = 1..L: delta for
  the step (bias, softplus), then for n = 1..N the update over the channel block (the innermost,
  vectorised loop; the state, N x block, stays in L1), then + D u and the gate. With autograd it
  also saves the state entering each chunk of T steps (``chunk_size``, default 32), delta after
  softplus and, with a gate, y + D u.
* backward: chunks last to first; per chunk, the forward is recomputed from the saved entry state
  into two (T, N, block) buffers (exp(Delta A) and h), then the adjoint runs backwards through
  them, with the gate's, the skip's and softplus's derivatives at each step.
  Memory: the saved states, batch * d_inner * d_state * ceil(L / T) floats, two or three
  (batch, L, d_inner) tensors, and per thread 2 * T * N * d_inner floats (buffers); never a
  (batch, d_inner, d_state, L) tensor. The output, the saved tensors and the three large
  gradients come from :mod:`.buffer_pool` (memory of earlier calls that nothing refers to any
  more, already paged in), not from fresh pages.
* exp: numba's ``math.exp`` on float32 is a scalar libm call that stops the loop from vectorising,
  so :func:`_expf` is written here: Cody-Waite range reduction x = k ln2 + r, the Cephes ``expf``
  polynomial for exp(r), and 2^k set in the exponent bits in two steps, so that results in
  float32's subnormal range come out as torch's do. Against float64's exp over [-120, 95] it is
  as close as torch's float32 exp (``pytest -s tests/test_scan_numba.py -k exp`` prints both
  relative errors; the test bounds ours by 2.5e-7), with 0, subnormal, inf and NaN exactly where
  torch's exp gives them. softplus uses it with
  the Cephes ``logf`` polynomial; silu with a division, as torch writes both.

Numerics: as the reference, to float32 round-off
------------------------------------------------
Only decays exp(Delta A) in (0, 1] (for Delta >= 0, A <= 0) ever multiply the state or the adjoint;
no closed form. Every elementwise product is formed in the order of the reference's torch ops
(Delta B then times u; (G h) then times the decay; (y + u D) then times silu(z); softplus and silu
and their backward as ATen's CPU kernels write them), so where the reference overflows these
kernels give inf and NaN at the same places. The kernels are compiled without fast-math flags but
``reassoc`` on the two reductions over channels (dl/dB, dl/dC: nothing but products and sums),
and never ``nnan``/``ninf``, which would let the compiler assume NaN and inf away; the only fused
multiply-adds are explicit ones inside exp and log, where nothing can overflow. Sums are reordered
(about 1e-7 relative), and at one edge the order shows: where finite terms near 1e38 are summed,
partial sums overflow in one order and not in another, so the reference may give NaN (-inf + inf)
where these kernels give inf (tests/test_scan.py lists the cases). Without a delta_bias the
kernels add zeros, which changes nothing but the sign of a zero delta.

Threads
-------
The kernels release the GIL; the work items are split across ``torch.get_num_threads()`` threads of
a small thread pool owned by this module, so ``torch.set_num_threads(1)`` (k-fold workers, sweeps)
means one thread, and the default uses every core torch uses. numba's own ``parallel=True`` is not
used: its threading layers are not fork-safe (GNU OpenMP), not safe to call from several threads at
once (workqueue; a Dask worker runs tasks in threads) or an extra package (TBB).

Compilation
-----------
The kernels compile on first use (27 s cold on a loaded core, 1.3 s from the cache: the ``compile``
entry of benchmarks/results/bench_scan.json; :func:`compile_kernels`) and are cached on disk
(``cache=True``: ``NUMBA_CACHE_DIR`` if set, else ``__pycache__`` beside this file, else numba's
user cache directory). Where no cache
location is writable they are compiled once per process instead.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch

from .buffer_pool import empty as pooled_empty

try:
    import numba
    from llvmlite import ir as llvm_ir
    from numba import njit
    from numba import types as nb_types
    from numba.extending import intrinsic
except (ImportError, OSError) as _err:  # numba is optional: selective_scan falls back to torch
    numba = None
    UNAVAILABLE_REASON: Optional[str] = f"{type(_err).__name__}: {_err}"
else:
    UNAVAILABLE_REASON = None

Tensor = torch.Tensor

#: True when numba imports and the compiled kernels can be used.
AVAILABLE = numba is not None

#: Steps per chunk T: the backward recomputes T steps at a time from the state saved at their start.
DEFAULT_CHUNK_SIZE = 32
#: Channels per work item at most. Every (t, n) step of a channel loop has a fixed cost (loop
#: entry, LLVM's run-time overlap checks, the two reductions over channels), so long loops pay off
#: even when the backward's (T, d_state, block) buffers then spill from L2: at d_inner 200 one
#: block of 200 channels ran the backward markedly faster than four blocks of at most 64 (timed
#: interleaved while tuning; the benchmark's write-up cell is measured with this setting).
MAX_CHANNEL_BLOCK = 256

# Constants of _expf, passed to the kernels as an array rather than frozen into the code: numba's
# JIT addresses frozen constants through 64-bit absolute addresses, two instructions per use in the
# innermost loop, whereas values read once at the start stay in registers or on the stack.
#        lower clamp, upper clamp, log2(e), 1/2, ln2 (high part), ln2 (low part),
#        Cephes expf polynomial p0..p5, 1
_EXP_CONSTANTS = np.array([-104.0, 89.0, 1.44269504088896341, 0.5, 0.693359375, -2.12194440e-4,
                           1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
                           1.6666665459e-1, 5.0000001201e-1, 1.0], dtype=np.float32)


# _COLUMNS_NOTE: channel loops run over unsigned indices. numba wraps negative indices around (as
# Python does), so with a signed loop bound that LLVM cannot prove non-negative every index becomes a
# select, and LLVM's vectoriser gives up on the loop ("unsafe indirect dependence"); unsigned
# indices are never wrapped.


def _jit(**options) -> Callable:
    """``njit(nogil=True, cache=True, error_model="numpy", **options)``, without the disk cache
    where no cache location is writable (numba raises RuntimeError at decoration time then).

    error_model="numpy": a float division by zero gives inf or NaN as IEEE 754 (and torch) say,
    instead of Python's ZeroDivisionError, whose check is an exit from the loop that stops it from
    vectorising."""
    def decorate(fn):
        try:
            return njit(nogil=True, cache=True, error_model="numpy", **options)(fn)
        except RuntimeError:
            return njit(nogil=True, cache=False, error_model="numpy", **options)(fn)
    return decorate


if AVAILABLE:
    @intrinsic
    def _scale_by_pow2(typingctx, p, k):
        """p * 2**k for float32 p in [0.7, 1.5] and a float32 k holding an integer in [-151, 129]:
        two multiplications by powers of two built in the exponent bits (k split in halves, each a
        normal float), so that a subnormal result is rounded once, as a correctly rounded exp's is."""
        sig = nb_types.float32(nb_types.float32, nb_types.float32)

        def codegen(context, builder, signature, args):
            i32 = llvm_ir.IntType(32)
            k_int = builder.fptosi(args[1], i32)
            k_lo = builder.ashr(k_int, llvm_ir.Constant(i32, 1))
            k_hi = builder.sub(k_int, k_lo)

            def pow2(e):  # the float whose exponent field is e + 127 and mantissa 0: 2**e
                bits = builder.shl(builder.add(e, llvm_ir.Constant(i32, 127)), llvm_ir.Constant(i32, 23))
                return builder.bitcast(bits, llvm_ir.FloatType())

            return builder.fmul(builder.fmul(args[0], pow2(k_lo)), pow2(k_hi))

        return sig, codegen

    @njit(inline="always")
    def _constants(c):
        return (c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12])

    @intrinsic
    def _fma(typingctx, a, b, c):
        """a * b + c rounded once (LLVM's llvm.fma.f32; vfmadd on AVX2). The kernels are compiled
        without fast-math 'contract', so this is the only fused multiply-add in them: inside the
        exp, where no operand can overflow."""
        sig = nb_types.float32(nb_types.float32, nb_types.float32, nb_types.float32)

        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return sig, codegen

    @njit(inline="always")
    def _expf(x, c):
        """exp(x) in float32 for any float32 x (NaN -> NaN, -inf -> 0, inf -> inf); branch-free so
        that the channel loop vectorises. c = _constants(_EXP_CONSTANTS)."""
        lo, hi, log2e, half, ln2_hi, ln2_lo, p0, p1, p2, p3, p4, p5, one = c
        xc = min(max(x, lo), hi)  # below -104 exp is 0 in float32, above 89 inf: k stays small
        k = np.floor(_fma(xc, log2e, half))  # x = k ln2 + r, |r| <= ln2 / 2
        r = _fma(k, -ln2_hi, xc)  # Cody-Waite: ln2 in two parts, so that r is exact
        r = _fma(k, -ln2_lo, r)
        r2 = r * r
        q = _fma(_fma(_fma(p0, r, p1), r2, _fma(p2, r, p3)), r2, _fma(p4, r, p5))  # Estrin
        e = _scale_by_pow2(_fma(q, r2, r) + one, k)
        return e if x == x else x  # NaN in, NaN out

    @intrinsic
    def _frexp(typingctx, x):
        """(m, k) with x = m * 2**k, m in [0.5, 1), for a normal float32 x > 0 (read from the bits)."""
        sig = nb_types.UniTuple(nb_types.float32, 2)(nb_types.float32)

        def codegen(context, builder, signature, args):
            i32 = llvm_ir.IntType(32)
            bits = builder.bitcast(args[0], i32)
            k = builder.sub(builder.lshr(bits, llvm_ir.Constant(i32, 23)), llvm_ir.Constant(i32, 126))
            m_bits = builder.or_(builder.and_(bits, llvm_ir.Constant(i32, 0x007FFFFF)),
                                 llvm_ir.Constant(i32, 0x3F000000))
            m = builder.bitcast(m_bits, llvm_ir.FloatType())
            kf = builder.sitofp(k, llvm_ir.FloatType())
            return context.make_tuple(builder, signature.return_type, [m, kf])

        return sig, codegen

    @njit(inline="always")
    def _logf(x):
        """log(x) for float32 x >= 1 (finite): Cephes ``logf``'s range reduction and polynomial."""
        m, k = _frexp(x)
        small = m < np.float32(0.70710678118654752440)
        k = k - np.float32(1.0) if small else k
        f = (m + m - np.float32(1.0)) if small else (m - np.float32(1.0))
        z = f * f
        y = _fma(np.float32(7.0376836292e-2), f, np.float32(-1.1514610310e-1))
        y = _fma(y, f, np.float32(1.1676998740e-1))
        y = _fma(y, f, np.float32(-1.2420140846e-1))
        y = _fma(y, f, np.float32(1.4249322787e-1))
        y = _fma(y, f, np.float32(-1.6668057665e-1))
        y = _fma(y, f, np.float32(2.0000714765e-1))
        y = _fma(y, f, np.float32(-2.4999993993e-1))
        y = _fma(y, f, np.float32(3.3333331174e-1))
        y = y * f * z
        y = _fma(k, np.float32(-2.12194440e-4), y)
        y = _fma(np.float32(-0.5), z, y)
        return _fma(k, np.float32(0.693359375), f + y)

    @njit(inline="always")
    def _softplus(x, c):
        """torch's softplus (beta 1, threshold 20): x > 20 ? x : log1p(exp(x)), with log1p(e) as
        log(1 + e) * e / ((1 + e) - 1) (exact where 1 + e rounds; e itself where it rounds to 1)."""
        e = _expf(x, c)
        u1 = e + np.float32(1.0)
        lg = _logf(min(u1, np.float32(3.0e38)))  # the clamp only guards the unused branch (x > 20)
        lp = e if u1 == np.float32(1.0) else lg * (e / (u1 - np.float32(1.0)))
        r = x if x > np.float32(20.0) else lp
        return r if x == x else x

    @njit(inline="always")
    def _softplus_grad(g, x, c):
        """torch's softplus_backward (beta 1, threshold 20): x > 20 ? g : g * e / (e + 1), e = exp(x)."""
        e = _expf(x, c)
        return g if x > np.float32(20.0) else g * e / (e + np.float32(1.0))

    @_jit()
    def _transpose_items(src, dst, lo, hi):
        """dst[b] = src[b].T for b in lo..hi-1; src (batch, X, Y), dst (batch, Y, X), both
        contiguous. In 8 x 8 tiles, whose fully unrolled copy LLVM turns into vector shuffles (torch's
        transposing copy_ 1.4-1.7x slower for (50, 200, 1023), one thread: ``python
        benchmarks/bench_block_ops.py``, benchmarks/README.md); plain loops at the edges."""
        X = src.shape[1]
        Y = src.shape[2]
        X8 = X - X % 8
        Y8 = Y - Y % 8
        for b in range(lo, hi):
            for x0 in range(0, X8, 8):
                for y0 in range(0, Y8, 8):
                    for i in range(8):
                        for j in range(8):
                            dst[b, y0 + j, x0 + i] = src[b, x0 + i, y0 + j]
                for y in range(Y8, Y):
                    for i in range(8):
                        dst[b, y, x0 + i] = src[b, x0 + i, y]
            for x in range(X8, X):
                for y in range(Y):
                    dst[b, y, x] = src[b, x, y]

    @_jit()
    def _exp_kernel(x, out, c_arr):
        c = _constants(c_arr)
        for i in range(x.shape[0]):
            out[i] = _expf(x[i], c)

    @_jit(fastmath={"reassoc"})
    def _dot(a, b3, j, k, lo, hi):
        """sum_{lo <= i < hi} a[i] * b3[j, k, i]; compiled with reassoc so that it vectorises."""
        acc = np.float32(0.0)
        for i in range(np.uint64(lo), np.uint64(hi)):  # unsigned: no negative-index wraparound
            acc += a[i] * b3[j, k, i]
        return acc

    @_jit(fastmath={"reassoc"})
    def _sum(a, lo, hi):
        """sum_{lo <= i < hi} a[i]; compiled with reassoc so that it vectorises."""
        acc = np.float32(0.0)
        for i in range(np.uint64(lo), np.uint64(hi)):
            acc += a[i]
        return acc

    @_jit()
    def _forward_items(u, dl, At, Bm, Cm, Dv, bias, z, zsb, zst, out, dt_save, v_save, last, starts,
                       softplus, has_D, has_bias, has_z, save, T, block, c_arr, lo, hi):
        """Forward of work items lo..hi-1, item = b * n_blocks + j for channels [j*block, ...).

        u, dl (raw delta): (batch, L, d_inner) time-major; z: flat, z[b, t, d] at
        z[b * zsb + t * zst + d] (:func:`_flat`: a half of in_proj's output is read in place);
        At: (d_state, d_inner) = A.T;
        Bm, Cm: (batch, d_state, L); Dv, bias: (d_inner,) (bias zeros without one). Writes out (batch, L, d_inner), last
        (batch, d_state, d_inner) and, with ``save``, dt_save (batch, L, d_inner) = delta after bias
        and softplus, v_save (batch, L, d_inner) = y + D u before the gate (if has_z), and
        starts[b, c] = the state before step c * T, (batch, n_chunks, d_state, d_inner). The flags
        are 0/1; arrays that a flag switches off are not read.
        """
        c = _constants(c_arr)
        one = np.float32(1.0)
        L = u.shape[1]
        D = u.shape[2]
        N = At.shape[0]
        n_blocks = (D + block - 1) // block
        h = np.empty((N, D), np.float32)  # only columns d0..d1 are used: indices stay d
        dt_row = np.empty(D, np.float32)
        y_row = np.empty(D, np.float32)
        for item in range(lo, hi):
            b = item // n_blocks
            d0 = (item % n_blocks) * block
            d1 = min(D, d0 + block)
            cols_lo, cols_hi = np.uint64(d0), np.uint64(d1)  # unsigned: see _COLUMNS_NOTE
            for n in range(N):
                for d in range(cols_lo, cols_hi):
                    h[n, d] = 0.0
            for t in range(L):
                if save and t % T == 0:
                    for n in range(N):
                        for d in range(cols_lo, cols_hi):
                            starts[b, t // T, n, d] = h[n, d]
                # the contract's delta: + bias (zeros without one: x + 0 is x, but for -0.0 -> 0.0),
                # then softplus. Flags are tested outside the channel loops: a branch inside one
                # would stop it from vectorising.
                if softplus:
                    for d in range(cols_lo, cols_hi):
                        dt_row[d] = _softplus(dl[b, t, d] + bias[d], c)
                else:
                    for d in range(cols_lo, cols_hi):
                        dt_row[d] = dl[b, t, d] + bias[d]
                for d in range(cols_lo, cols_hi):
                    y_row[d] = 0.0
                if save:
                    for d in range(cols_lo, cols_hi):
                        dt_save[b, t, d] = dt_row[d]
                for n in range(N):  # rows indexed in place: a view per (t, n) costs two atomics
                    bn = Bm[b, n, t]
                    cn = Cm[b, n, t]
                    for d in range(cols_lo, cols_hi):
                        dt = dt_row[d]
                        hn = _expf(dt * At[n, d], c) * h[n, d] + (dt * bn) * u[b, t, d]
                        h[n, d] = hn
                        y_row[d] += cn * hn
                # the contract's output: + D u, then times silu(z) (as torch writes silu)
                if has_D:
                    for d in range(cols_lo, cols_hi):
                        y_row[d] = y_row[d] + u[b, t, d] * Dv[d]
                if has_z:
                    if save:
                        for d in range(cols_lo, cols_hi):
                            v_save[b, t, d] = y_row[d]
                    zrow = np.uint64(b * zsb + t * zst)  # unsigned: see _COLUMNS_NOTE
                    for d in range(cols_lo, cols_hi):
                        zz = z[zrow + d]
                        out[b, t, d] = y_row[d] * (zz / (one + _expf(-zz, c)))
                else:
                    for d in range(cols_lo, cols_hi):
                        out[b, t, d] = y_row[d]
            for n in range(N):
                for d in range(cols_lo, cols_hi):
                    last[b, n, d] = h[n, d]

    @_jit()
    def _recompute_chunk(u, dt_all, At, Bm, a_buf, h_buf, b, d0, d1, s, e, c):
        """The forward over steps s..e-1, channels d0..d1-1, from the state in h_buf[0]:
        a_buf[i] = exp(Delta A) and h_buf[i + 1] = h at step s + i, both (d_state, d_inner)."""
        N = At.shape[0]
        cols_lo, cols_hi = np.uint64(d0), np.uint64(d1)  # unsigned: see _COLUMNS_NOTE
        for t in range(s, e):
            i = t - s
            for n in range(N):  # rows indexed in place: a view per (t, n) costs two atomics
                bn = Bm[b, n, t]
                for d in range(cols_lo, cols_hi):
                    dt = dt_all[b, t, d]
                    a = _expf(dt * At[n, d], c)
                    a_buf[i, n, d] = a
                    h_buf[i + 1, n, d] = a * h_buf[i, n, d] + (dt * bn) * u[b, t, d]

    @_jit()
    def _adjoint_chunk(u, dt_all, dl, At, Bm, Cm, Dv, bias, z, zsb, zst, v_save, g_out, gu, gdl, gz, gA_b,
                       gB_j, gC_j, gD_b, gbias_b, a_buf, h_buf, carry, acc, softplus, has_D,
                       has_bias, has_z, b, d0, d1, s, e, c):
        """The adjoint over steps e-1..s (see the module docstring), channels d0..d1-1, with the
        contract's gate, D skip, bias and softplus differentiated around it as torch's autograd
        does. carry (d_state, d_inner) holds exp(Delta_{t+1} A) G_{t+1} on entry and on exit;
        gA_b (d_state, d_inner), gD_b and gbias_b (d_inner,) accumulate this batch element's
        part; gB_j, gC_j (batch, d_state, L) receive this channel block's part of dl/dB, dl/dC;
        acc is (5, d_inner) scratch."""
        one = np.float32(1.0)
        N = At.shape[0]
        cols_lo, cols_hi = np.uint64(d0), np.uint64(d1)  # unsigned: see _COLUMNS_NOTE
        g_dA = acc[0]  # sum_n A P          (this step's dl/dDelta, first term)
        g_dB = acc[1]  # sum_n B (G u)      (second term)
        g_u = acc[2]   # sum_n G (Delta B)
        tmp = acc[3]   # Delta (G u), summed over channels into dl/dB
        gy = acc[4]    # dl/dy: the output's gradient through the gate
        for t in range(e - 1, s - 1, -1):
            i = t - s
            if has_z:  # out = v * silu(z): torch's mul and silu_backward
                zrow = np.uint64(b * zsb + t * zst)
                for d in range(cols_lo, cols_hi):
                    zz = z[zrow + d]
                    ez = _expf(-zz, c)
                    sig = one / (one + ez)
                    gz[b, t, d] = (g_out[b, t, d] * v_save[b, t, d]) * sig * (one + zz * (one - sig))
                    gy[d] = g_out[b, t, d] * (zz / (one + ez))
            else:
                for d in range(cols_lo, cols_hi):
                    gy[d] = g_out[b, t, d]
            for d in range(cols_lo, cols_hi):
                g_dA[d] = 0.0
                g_dB[d] = 0.0
                g_u[d] = 0.0
            for n in range(N):  # rows indexed in place: a view per (t, n) costs two atomics
                bn = Bm[b, n, t]
                cn = Cm[b, n, t]
                for d in range(cols_lo, cols_hi):
                    dt = dt_all[b, t, d]
                    decay = a_buf[i, n, d]
                    G = cn * gy[d] + carry[n, d]
                    P = (G * h_buf[i, n, d]) * decay
                    g_dA[d] += At[n, d] * P
                    gA_b[n, d] += dt * P
                    Gu = G * u[b, t, d]
                    g_dB[d] += bn * Gu
                    g_u[d] += G * (dt * bn)
                    tmp[d] = dt * Gu
                    carry[n, d] = decay * G
                gB_j[b, n, t] = _sum(tmp, d0, d1)
                gC_j[b, n, t] = _dot(gy, h_buf, i + 1, n, d0, d1)
            if softplus:  # torch's softplus_backward at delta + bias
                for d in range(cols_lo, cols_hi):
                    gdl[b, t, d] = _softplus_grad(g_dA[d] + g_dB[d], dl[b, t, d] + bias[d], c)
            else:
                for d in range(cols_lo, cols_hi):
                    gdl[b, t, d] = g_dA[d] + g_dB[d]
            if has_bias:
                for d in range(cols_lo, cols_hi):
                    gbias_b[d] += gdl[b, t, d]
            if has_D:  # v = y + u * D
                for d in range(cols_lo, cols_hi):
                    gu[b, t, d] = g_u[d] + gy[d] * Dv[d]
                    gD_b[d] += gy[d] * u[b, t, d]
            else:
                for d in range(cols_lo, cols_hi):
                    gu[b, t, d] = g_u[d]

    @_jit()
    def _backward_items(u, dt_all, dl, At, Bm, Cm, Dv, bias, z, zsb, zst, v_save, starts, g_out, glast, gu,
                        gdl, gz, gA, gB, gC, gD, gbias, softplus, has_D, has_bias, has_z, T, block,
                        c_arr, lo, hi):
        """Backward of work items lo..hi-1 (numbered as in :func:`_forward_items`).

        g_out (batch, L, d_inner), glast (batch, d_state, d_inner): the gradients of the outputs;
        writes gu, gdl (raw delta), gz (if has_z): (batch, L, d_inner); gA: (batch, d_state,
        d_inner), gD, gbias: (batch, d_inner) per batch element; gB, gC: (n_blocks, batch,
        d_state, L) per channel block.
        """
        c = _constants(c_arr)
        L = u.shape[1]
        D = u.shape[2]
        N = At.shape[0]
        n_blocks = (D + block - 1) // block
        n_chunks = starts.shape[1]
        # full-width buffers of which only the item's columns d0..d1 are used (and so cached):
        # indexing by the channel itself keeps every access in the channel loop the same simple
        # pattern, which LLVM's vectoriser needs
        a_buf = np.empty((T, N, D), np.float32)
        h_buf = np.empty((T + 1, N, D), np.float32)
        carry = np.empty((N, D), np.float32)
        acc = np.empty((5, D), np.float32)
        for item in range(lo, hi):
            b = item // n_blocks
            j = item % n_blocks
            d0 = j * block
            d1 = min(D, d0 + block)
            cols_lo, cols_hi = np.uint64(d0), np.uint64(d1)  # unsigned: see _COLUMNS_NOTE
            for d in range(cols_lo, cols_hi):
                gD[b, d] = 0.0
                gbias[b, d] = 0.0
            for n in range(N):
                for d in range(cols_lo, cols_hi):
                    carry[n, d] = glast[b, n, d]
                    gA[b, n, d] = 0.0
            for ci in range(n_chunks - 1, -1, -1):
                s = ci * T
                e = min(L, s + T)
                for n in range(N):
                    for d in range(cols_lo, cols_hi):
                        h_buf[0, n, d] = starts[b, ci, n, d]
                _recompute_chunk(u, dt_all, At, Bm, a_buf, h_buf, b, d0, d1, s, e, c)
                _adjoint_chunk(u, dt_all, dl, At, Bm, Cm, Dv, bias, z, zsb, zst, v_save, g_out, gu, gdl, gz,
                               gA[b], gB[j], gC[j], gD[b], gbias[b], a_buf, h_buf, carry, acc,
                               softplus, has_D, has_bias, has_z, b, d0, d1, s, e, c)


def exp_f32(x: Tensor) -> Tensor:
    """exp computed by the kernels' own float32 exp (:func:`_expf`), elementwise; for tests and
    benchmarks. x: any shape, float32 on the CPU. Returns a new float32 tensor of x's shape.

    Raises:
        RuntimeError: numba is not importable.
        TypeError: x is not float32.
    """
    if not AVAILABLE:
        raise RuntimeError(f"numba cannot be imported ({UNAVAILABLE_REASON})")
    if x.dtype != torch.float32:
        raise TypeError(f"exp_f32 takes float32, got {x.dtype}")
    flat = x.detach().reshape(-1).contiguous()
    out = torch.empty_like(flat)
    _exp_kernel(flat.numpy(), out.numpy(), _EXP_CONSTANTS)
    return out.reshape(x.shape)


# ----------------------------------------------------------------------------- threads

_POOL: Optional[ThreadPoolExecutor] = None
_POOL_KEY: Tuple[int, int] = (0, 0)  # (pid, max_workers) of _POOL
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """The module's thread pool with at least ``workers`` threads, made anew in a forked child
    (whose copy of the parent's pool has no threads)."""
    global _POOL, _POOL_KEY
    with _POOL_LOCK:
        pid = os.getpid()
        if _POOL is None or _POOL_KEY[0] != pid or _POOL_KEY[1] < workers:
            size = max(workers, os.cpu_count() or 1)
            _POOL = ThreadPoolExecutor(max_workers=size, thread_name_prefix="prot_lib_scan")
            _POOL_KEY = (pid, size)
        return _POOL


def _run_items(kernel: Callable, n_items: int, *args) -> None:
    """kernel(*args, lo, hi) over items 0..n_items-1, split into contiguous ranges across
    min(torch.get_num_threads(), n_items) threads (the calling thread runs the first)."""
    workers = max(1, min(torch.get_num_threads(), n_items))
    if workers == 1:
        kernel(*args, 0, n_items)
        return
    bounds = [round(i * n_items / workers) for i in range(workers + 1)]
    pool = _pool(workers - 1)
    futures = [pool.submit(kernel, *args, bounds[i], bounds[i + 1]) for i in range(1, workers)]
    try:
        kernel(*args, bounds[0], bounds[1])
    finally:
        for f in futures:
            f.result()


def channel_block(batch: int, d_inner: int, threads: Optional[int] = None) -> int:
    """Channels per work item: at most :data:`MAX_CHANNEL_BLOCK`, a multiple of 8 (one AVX2
    vector), and small enough that batch * blocks covers ``threads`` (default
    torch.get_num_threads()) when the batch alone does not."""
    threads = torch.get_num_threads() if threads is None else threads
    n_blocks = -(-d_inner // MAX_CHANNEL_BLOCK)
    while batch * n_blocks < threads and n_blocks * 8 < d_inner:
        n_blocks += 1
    block = -(-d_inner // n_blocks)
    return min(d_inner, -(-block // 8) * 8)


# ----------------------------------------------------------------------------- autograd

def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _swapped(t: Tensor) -> Tensor:
    """t (batch, X, Y), contiguous float32 -> a new contiguous (batch, Y, X), by the tiled kernel."""
    out = t.new_empty((t.shape[0], t.shape[2], t.shape[1]))
    _run_items(_transpose_items, t.shape[0], _np(t), _np(out))
    return out


def _time_major(t: Tensor) -> Tensor:
    """(batch, d_inner, L) -> contiguous (batch, L, d_inner); no copy where the memory already is
    (Mamba's layout), the tiled kernel where t is contiguous (mamba-ssm's layout), else torch."""
    tt = t.transpose(1, 2)
    if tt.is_contiguous():
        return tt
    if t.is_contiguous() and t.dtype == torch.float32:
        return _swapped(t)
    return tt.contiguous()


def _channel_last(t: Tensor) -> Tensor:
    """(batch, d_inner, L) -> a (batch, L, d_inner) view with unit channel stride, copied only
    where it has none (a half of in_proj's output, Mamba's z, is read in place via :func:`_flat`)."""
    tt = t.transpose(1, 2)
    return tt if tt.stride(-1) == 1 else _time_major(t)


def _flat(t: Tensor) -> Tuple[np.ndarray, int, int]:
    """t (batch, L, C) with unit channel stride, as a flat array over the memory it spans and its
    batch and time strides (element [b, s, d] at b * sb + s * st + d): the kernels index it as
    contiguous rows, which vectorise (numba's code for arbitrary strides does not)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    span = (t.shape[0] - 1) * t.stride(0) + (t.shape[1] - 1) * t.stride(1) + t.shape[2]
    return _np(torch.as_strided(t, (span,), (1,), t.storage_offset())), t.stride(0), t.stride(1)


def _mamba_layout(t: Tensor) -> bool:
    """True where t (batch, X, L) is contiguous in mamba-ssm's layout (and not also time-major)."""
    return t.is_contiguous() and not t.transpose(1, 2).is_contiguous()


def _grad_as(g: Tensor, like_mamba_layout: bool) -> Tensor:
    """The gradient g (batch, L, X) (contiguous) as (batch, X, L): in mamba-ssm's contiguous layout
    where the input had it (autograd then accumulates it into a leaf without a copy), else a view."""
    return _swapped(g) if like_mamba_layout else g.transpose(1, 2)


class _NumbaScanFn(torch.autograd.Function):
    """The whole contract on float32 CPU tensors: u, delta, z (batch, d_inner, L); A (d_inner,
    d_state); B, C (batch, d_state, L); D, delta_bias (d_inner,) or None. Returns out
    (batch, d_inner, L) (a view of a time-major tensor) and the last state (batch, d_inner,
    d_state). Single backward only."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, T):
        save = any(ctx.needs_input_grad)
        ut, dl = _time_major(u), _time_major(delta)
        ctx.layouts = (_mamba_layout(u), _mamba_layout(delta), z is not None and _mamba_layout(z))
        batch, L, d_inner = ut.shape
        d_state = A.shape[1]
        At, Bc, Cc = A.t().contiguous(), B.contiguous(), C.contiguous()
        dummy = ut.new_zeros((1, 1, 1))
        Dv = D.contiguous() if D is not None else ut.new_zeros(1)
        bias = delta_bias.contiguous() if delta_bias is not None else ut.new_zeros(d_inner)
        zt = _channel_last(z) if z is not None else ut.new_zeros((1, 1, 1))
        # the large tensors from the buffer pool (memory already paged in; see buffer_pool)
        out = pooled_empty((batch, L, d_inner))
        last = ut.new_empty((batch, d_state, d_inner))
        starts = pooled_empty((batch, -(-L // T) if save else 0, d_state, d_inner))
        dt_save = pooled_empty((batch, L, d_inner)) if save else dummy
        v_save = pooled_empty((batch, L, d_inner)) if save and z is not None else dummy
        flags = (int(softplus), int(D is not None), int(delta_bias is not None), int(z is not None))
        block = channel_block(batch, d_inner)
        _run_items(_forward_items, batch * (-(-d_inner // block)), _np(ut), _np(dl), _np(At), _np(Bc),
                   _np(Cc), _np(Dv), _np(bias), *_flat(zt), _np(out), _np(dt_save), _np(v_save), _np(last),
                   _np(starts), *flags, int(save), T, block, _EXP_CONSTANTS)
        if save:
            ctx.save_for_backward(ut, dt_save, dl, At, Bc, Cc, Dv, bias, zt, v_save, starts)
            ctx.flags, ctx.T = flags, T
        ctx.set_materialize_grads(False)
        return out.transpose(1, 2), last.transpose(1, 2).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_last):
        ut, dt_save, dl, At, Bc, Cc, Dv, bias, zt, v_save, starts = ctx.saved_tensors
        softplus, has_D, has_bias, has_z = ctx.flags
        batch, L, d_inner = ut.shape
        d_state = At.shape[0]
        g_out = ut.new_zeros((batch, L, d_inner)) if g_out is None else _time_major(g_out)
        g_last = ut.new_zeros((batch, d_state, d_inner)) if g_last is None else _time_major(g_last)
        block = channel_block(batch, d_inner)
        n_blocks = -(-d_inner // block)
        gu, gdl = pooled_empty(ut.shape), pooled_empty(ut.shape)
        gz = pooled_empty(ut.shape) if has_z else ut.new_zeros((1, 1, 1))
        gA = ut.new_empty((batch, d_state, d_inner))
        gB = ut.new_empty((n_blocks, batch, d_state, L))
        gC = ut.new_empty((n_blocks, batch, d_state, L))
        gD = ut.new_empty((batch, d_inner))
        gbias = ut.new_empty((batch, d_inner))
        _run_items(_backward_items, batch * n_blocks, _np(ut), _np(dt_save), _np(dl), _np(At), _np(Bc),
                   _np(Cc), _np(Dv), _np(bias), *_flat(zt), _np(v_save), _np(starts), _np(g_out),
                   _np(g_last), _np(gu), _np(gdl), _np(gz), _np(gA), _np(gB), _np(gC), _np(gD),
                   _np(gbias), softplus, has_D, has_bias, has_z, ctx.T, block, _EXP_CONSTANTS)
        u_layout, delta_layout, z_layout = ctx.layouts
        return (_grad_as(gu, u_layout), _grad_as(gdl, delta_layout), gA.sum(0).t(), gB.sum(0), gC.sum(0),
                gD.sum(0) if has_D else None, _grad_as(gz, z_layout) if has_z else None,
                gbias.sum(0) if has_bias else None, None, None)


def numba_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
               z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None,
               delta_softplus: bool = False, chunk_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """mamba-ssm's ``selective_scan_ref`` on float32 CPU tensors, every step in the compiled
    kernels: delta + delta_bias, softplus, the recurrence, + D u, * silu(z); differentiable in
    every tensor argument.

    Args:
        u, delta: (batch, d_inner, L) float32 (any strides; the (batch, L, d_inner) memory layout
            that :class:`~prot_lib.models.Mamba` makes is read without a copy).
        A: (d_inner, d_state) float32.
        B, C: (batch, d_state, L) float32.
        D, delta_bias: (d_inner,) float32, optional.
        z: (batch, d_inner, L) float32, optional: the output is multiplied by silu(z).
        delta_softplus: apply torch's softplus (threshold 20) to delta + delta_bias.
        chunk_size: steps T between the states saved for the backward (memory ~ L / T states;
            default 32).

    Returns:
        out: (batch, d_inner, L) float32 (a view of a (batch, L, d_inner) tensor);
        last_state: (batch, d_inner, d_state) float32.

    Raises:
        RuntimeError: numba is not importable (:data:`UNAVAILABLE_REASON` says why).
        ValueError: ``chunk_size`` < 1.
    """
    if not AVAILABLE:
        raise RuntimeError(f"the numba scan needs numba, which cannot be imported ({UNAVAILABLE_REASON})")
    T = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if T < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _NumbaScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), T)


# ----------------------------------------------------------------------------- compilation

_COMPILE_INFO: Dict[str, object] = {}


def compile_kernels() -> Dict[str, object]:
    """Compile (or load from the disk cache) both kernels now, by running them once on tiny inputs.

    Returns:
        {"seconds": wall time of this first call, "cache_hits": entry kernels (forward, backward)
        loaded from the disk cache, "cache_misses": entry kernels compiled, "cache_dir": where the
        cache lives (None without one)};
        the same dict on later calls (nothing is compiled twice in a process).

    Raises:
        RuntimeError: numba is not importable.
    """
    if not AVAILABLE:
        raise RuntimeError(f"numba cannot be imported ({UNAVAILABLE_REASON})")
    if _COMPILE_INFO:
        return dict(_COMPILE_INFO)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    # batch 1, d_inner 2, d_state 2, L 8: u, delta, A, B, C
    args = [torch.rand(1, 2, 8, generator=g), torch.rand(1, 2, 8, generator=g),
            -torch.rand(2, 2, generator=g), torch.rand(1, 2, 8, generator=g),
            torch.rand(1, 2, 8, generator=g)]
    leaves = [t.requires_grad_(True) for t in args]
    extra = [torch.rand(2, generator=g).requires_grad_(True), torch.rand(1, 2, 8, generator=g).requires_grad_(True),
             torch.rand(2, generator=g).requires_grad_(True)]  # D, z, delta_bias
    with torch.enable_grad():
        y, last = numba_scan(*leaves, *extra, delta_softplus=True)
        torch.autograd.grad(y.sum() + last.sum(), leaves + extra)
    with torch.no_grad():
        numba_scan(*args)  # the same kernels without saving
    # the kernels called from Python (the others are compiled into them and cached with them)
    stats = [k.stats for k in (_forward_items, _backward_items)]
    cache_dir = next((s.cache_path for s in stats if s.cache_path), None)
    _COMPILE_INFO.update({
        "seconds": time.perf_counter() - t0,
        "cache_hits": sum(sum(s.cache_hits.values()) for s in stats),
        "cache_misses": sum(sum(s.cache_misses.values()) for s in stats),
        "cache_dir": cache_dir,
    })
    return dict(_COMPILE_INFO)
