"""The all-hooks multiclass probe: one L2 logistic regression per hook, fitted by L-BFGS in worker threads."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy.linalg.blas import daxpy, ddot
import torch

from probing_core.errors import ProbeError
from probing_core.solvers.splits import check_Cs, check_labels, stratified_split
from probing_core.threads import map_hooks, single_threaded



@dataclass(frozen=True)
class LayerProbeResult:
    """An L2 logistic probe per hook (one L-BFGS per hook, hooks spread over worker threads).

    H = hooks, m = 1 (two classes) or number of classes, d = features per hook.
    """

    hooks: list[str]
    classes: np.ndarray  # (n_classes,)
    class_counts: dict  # class -> {"train": int, "test": int}
    train_accuracy: np.ndarray  # (H,)
    test_accuracy: np.ndarray  # (H,)
    chance: float  # majority-class accuracy on the test split
    C: float
    coefs: np.ndarray  # (H, m, d) standardized units
    intercepts: np.ndarray  # (H, m)
    grad_norm: np.ndarray  # (H,) inf-norm of the gradient w.r.t. (W, b) of objective / (C n)
    converged: np.ndarray  # (H,) bool: grad_norm <= 10 * tol
    n_iter: int
    train_idx: np.ndarray
    test_idx: np.ndarray
    fit_seconds: float = 0.0

    def table(self) -> list[dict]:
        return [
            {"hook": h, "train_accuracy": float(self.train_accuracy[i]), "test_accuracy": float(self.test_accuracy[i]),
             "chance": self.chance, "converged": bool(self.converged[i])}
            for i, h in enumerate(self.hooks)
        ]


def _bf16_matmul_is_fast() -> bool:
    """True where bf16 GEMMs run natively (AMX / AVX-512 BF16); elsewhere they are emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _scratch(store: dict, key: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A reusable buffer of ``shape`` from ``store`` (one store per worker thread and fit).

    Writing into a fresh 16 MB tensor costs ~10 ms of page faults here, more than the pass that
    fills it; hooks fitted one after another on a worker reuse its buffers instead.
    """
    size = math.prod(shape)
    buf = store.get((key, dtype))
    if buf is None or buf.numel() < size:
        buf = store[(key, dtype)] = torch.empty(size, dtype=dtype)
    return buf[:size].view(shape)


class _NonFinite(Exception):
    """A hook's features hold NaN or inf (reported with the hook's name by the caller)."""


# fp32 rows are kept in the row layout only and both products go through NumPy's BLAS (OpenBLAS), which
# reads ``X`` as ``X`` or ``Xᵀ`` without a copy: on this AMD EPYC (AVX2) its single-threaded
# 1,147 × 576 × 20 products took 0.41-0.55 ms against torch/MKL's 0.72 ms, and the Layer probes
# default table (31 hooks, real + control task) fitted 1.1-1.2× faster with half the memory (no
# transposed copy). bf16 copies (CPUs with native bf16 GEMMs) keep both layouts and torch.
_CHUNK = 512  # rows per block in the row-wise passes: 512 × d fp32 stays in a 2 MB L2 up to d ≈ 1000
_BLOCK_BYTES = 1 << 20  # ... and narrower rows go in blocks of ~1 MB (fewer calls per pass)


def _block_rows(d: int) -> int:
    return max(_CHUNK, _BLOCK_BYTES // (4 * d))


class _HookData:
    """One hook's training rows for the solver: fp32 rows ``(n, d)`` (both products through NumPy's BLAS),
    or bf16 copies in both layouts (rows ``(n, d)`` and ``(d, n)``, torch).

    One pass reads the rows from the hook's array (a memmap is read in place) a block at a time,
    accumulates the column statistics and writes the rows, less a shift (the first block's
    column means, so bf16 keeps the variation and not the offset), in bf16 (``low``) or fp32.
    The standardization ``(x - mu) / sd`` is folded into :meth:`fwd` and :meth:`grad` (a rank-one
    correction and a column scale), so no second pass is needed. For bf16 the row layout serves
    ``X W`` and the transposed one ``X^T R`` (torch: each GEMM with its big operand unpacked, 2-4x
    faster than either product on one layout); fp32 rows serve both through NumPy. Exact figures
    (fp32 decision values, gradient, test predictions) come from :meth:`exact_grad` and
    :meth:`predict_rows`, which re-read the fp32 rows a block at a time (one read for both products).
    """

    def __init__(self, a_: np.ndarray, rows: torch.Tensor, standardize: bool, low: bool, bufs: dict):
        self.src = a_ if a_.flags.c_contiguous else np.ascontiguousarray(a_)
        self.rows, self.bufs = rows, bufs
        n, d = rows.numel(), self.src.shape[1]
        self.n, self.d = n, d
        self.chunk = _block_rows(d)
        self.blk = _scratch(bufs, "block", (min(self.chunk, max(n, 1)), d))
        self.shift = None
        self._store(torch.bfloat16 if low else torch.float32, stats=True)
        m1 = self._s1[0] / n  # mean of (x - shift)
        if not bool(torch.isfinite(m1).all() and torch.isfinite(self._s2).all()):
            raise _NonFinite()
        if standardize:
            self.mu = self.shift + m1
            sd = (self._s2[0] / n - m1 * m1).clamp_(min=0).sqrt_()
            # A column constant to fp32 rounding keeps scale 1 (like scikit-learn's StandardScaler).
            self.sd = torch.where(sd <= 1e-6 * self.mu.abs() + 1e-12, torch.ones_like(sd), sd)
        else:
            self.mu, self.sd = torch.zeros(d), torch.ones(d)
        self.delta = (self.mu - self.shift).unsqueeze(1)  # (d, 1): x - mu = stored - delta
        self.inv_sd = (1.0 / self.sd).unsqueeze(1)  # (d, 1)
        self.delta_n = self.delta[:, 0].double().numpy()  # the same in NumPy (d,), float64
        self.inv_sd_n = self.inv_sd[:, 0].double().numpy()
        self.low = low

    def _blocks(self, rows: torch.Tensor, shift: torch.Tensor | None = None, into: torch.Tensor | None = None):
        """``(start, block)``: fp32 rows ``rows[start:start+c]`` of the source, less ``shift``;
        gathered into ``into[start:start+c]`` (fp32) if given, else into a reused block."""
        for s0 in range(0, rows.numel(), self.chunk):
            idx = rows[s0:s0 + self.chunk].numpy()
            b = self.blk[: idx.size] if into is None else into[s0:s0 + idx.size]
            # Indices were checked by the caller; mode="raise" with out= gathers into a temporary
            # and copies it (2x slower here).
            if self.src.dtype == np.float32:  # NumPy's gather reads a memmap in place
                np.take(self.src, idx, axis=0, out=b.numpy(), mode="clip")
            else:
                b.copy_(torch.from_numpy(np.take(self.src, idx, axis=0, mode="clip")))
            if shift is not None:
                b.sub_(shift)
            yield s0, b

    def _store(self, dtype: torch.dtype, stats: bool) -> None:
        """Write ``x - shift`` of the training rows in ``dtype`` (both layouts); optionally sum it."""
        X = _scratch(self.bufs, "rows", (self.n, self.d), dtype)
        one = dtype == torch.float32
        XT = None if one else _scratch(self.bufs, "cols", (self.d, self.n), dtype)
        ones = torch.ones(1, self.blk.shape[0])
        sq = _scratch(self.bufs, "square", tuple(self.blk.shape)) if stats else None
        self._s1, self._s2 = torch.zeros(1, self.d), torch.zeros(1, self.d)
        direct = dtype == torch.float32  # fp32 rows are gathered straight into place
        for s0, b in self._blocks(self.rows, into=X if direct else None):
            c = b.shape[0]
            if self.shift is None:
                self.shift = b.mean(dim=0)
            b.sub_(self.shift)
            if stats:
                self._s1.addmm_(ones[:, :c], b)
                self._s2.addmm_(ones[:, :c], torch.mul(b, b, out=sq[:c]))
            rows_ = b if direct else X[s0:s0 + c].copy_(b)
            if XT is not None:
                XT[:, s0:s0 + c].copy_(rows_.T)
        self.X, self.XT = X, (X.T if XT is None else XT)

    def to_exact(self) -> None:
        """Continue on fp32 copies (the bf16 ones could not reach the tolerance)."""
        if self.low:
            self.low = False
            self._store(torch.float32, stats=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.X.dtype

    def fwd(self, W: np.ndarray, bias: np.ndarray) -> torch.Tensor:
        """``X W + bias`` ``(n, m)`` fp32 for standardized X; ``W (d, m)``, ``bias (m,)`` NumPy.

        The small matrices are folded in NumPy; the pass over the data is one torch call (fp32).
        """
        Ws = (W * self.inv_sd_n[:, None]).astype(np.float32)
        row = torch.from_numpy((bias - self.delta_n @ Ws).astype(np.float32))
        if self.X.dtype == torch.float32:
            Z = np.matmul(self.X.numpy(), Ws)
            Z += row.numpy()
            return torch.from_numpy(Z)
        return torch.mm(self.X, torch.from_numpy(Ws).to(self.X.dtype)).float().add_(row)

    def grad(self, R: torch.Tensor, rsum: np.ndarray) -> np.ndarray:
        """``X^T R`` ``(d, m)`` float64 NumPy for standardized X, ``R (n, m)`` (in :attr:`dtype`) and
        its column sums ``rsum (m,)``."""
        if R.dtype == torch.float32 and self.X.dtype == torch.float32:
            G = (R.numpy().T @ self.X.numpy()).T.astype(np.float64)  # (Rᵀ X)ᵀ: X read in its row layout
        else:
            G = torch.mm(self.XT, R)
            G = (G if G.dtype == torch.float32 else G.float()).numpy().astype(np.float64)
        G -= np.outer(self.delta_n, rsum)
        G *= self.inv_sd_n[:, None]
        return G

    def _raw_rows(self) -> tuple[torch.Tensor | None, np.ndarray]:
        """``(shift, delta (d,))`` for the exact passes over the source rows: the standardization
        is folded into the small matrices (``x W' + c``), so a block is only gathered, not
        rescaled. The shift is subtracted only where a column's mean is large next to its spread
        (folding it would then cancel digits); otherwise the raw rows go straight into the GEMM."""
        if bool((self.mu.abs() <= 8.0 * self.sd).all()):
            return None, self.mu.double().numpy()
        return self.shift, self.delta_n

    def _folded(self, W: np.ndarray, b: np.ndarray):
        """``(shift, delta, Ws, bias)``: standardized ``x W + b`` = ``(x - shift) Ws + bias``
        (``Ws``, ``bias`` fp32 tensors)."""
        shift, delta = self._raw_rows()
        Ws = W * self.inv_sd_n[:, None]
        bias = b - delta @ Ws
        return shift, delta, torch.from_numpy(Ws.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))

    def predict_rows(self, rows: torch.Tensor, W: np.ndarray, b: np.ndarray) -> torch.Tensor:
        """Exact fp32 decision values ``(len(rows), m)`` of any rows (e.g. the test split)."""
        shift, _, Ws, bias = self._folded(W, b)
        Z = torch.empty(rows.numel(), W.shape[1])
        for s0, blk in self._blocks(rows, shift):
            torch.addmm(bias, blk, Ws, out=Z[s0:s0 + blk.shape[0]])
        return Z

    def exact_grad(self, Z: torch.Tensor, T: torch.Tensor, probs, W: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Fill ``Z`` with exact decision values of the training rows; return ``X^T (P - T)``
        (float64 NumPy).

        One read of the fp32 rows: each block's decision values, residual and gradient share
        the block while it is in cache.
        """
        shift, delta, Ws, bias = self._folded(W, b)
        G = torch.zeros(self.d, W.shape[1])
        rsum = torch.zeros(1, W.shape[1])
        for s0, blk in self._blocks(self.rows, shift):
            c = blk.shape[0]
            Zc = torch.addmm(bias, blk, Ws, out=Z[s0:s0 + c])
            Rc = probs(Zc).sub_(T[s0:s0 + c])
            G.addmm_(blk.T, Rc)
            rsum.add_(Rc.sum(dim=0))
        Gn = G.numpy().astype(np.float64)
        Gn -= np.outer(delta, rsum.numpy()[0])
        Gn *= self.inv_sd_n[:, None]
        return Gn

    def covariance_sample(self, max_rows: int = 2048) -> torch.Tensor:
        """Standardized covariance ``(d, d)`` from a row subsample (for a preconditioner)."""
        Xs = self.XT[:, :: max(1, self.n // max_rows)].float()
        Xs = (Xs - Xs.mean(dim=1, keepdim=True)).mul_(self.inv_sd)
        return torch.mm(Xs, Xs.T).div_(Xs.shape[1])


def _hook_eigs(data: _HookData) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigendecomposition of one hook's feature covariance: fp64 eigh of a subsample's fp32 Gram.

    Only a preconditioner. -> ``(evals (d,), evecs (d, d))``.
    """
    ev, U = torch.linalg.eigh(data.covariance_sample().double())
    return ev.clamp(min=0).float(), U.float()


_MEAN_SHIFT_MAX_CLASSES = 15


def _softmax_rows(Z: torch.Tensor) -> torch.Tensor:
    """Row softmax of ``Z (n, m)``; for m < 16 shifted by the row mean instead of the row max.

    torch's softmax over a short last dimension is slow here except at m = 16 (a fast path);
    with the row means and sums as matrix-vector products, the all-hooks fit (d = 128, 7 hooks,
    in-process A/B) ran 1.21x (m = 4), 1.42x (8) and 1.41x (12) faster, but 0.95x (16), 0.91x (20)
    and 0.99x (32), hence the bound. The largest term is >= 1 (no division by an underflowed
    sum); a row whose max is more than ~88 above its mean overflows, and then the call falls
    back to torch's softmax.
    """
    n, m = Z.shape
    if m > _MEAN_SHIFT_MAX_CLASSES:
        return torch.softmax(Z, dim=1)
    v = torch.mv(Z, torch.full((m,), 1.0 / m, dtype=Z.dtype))
    E = torch.sub(Z, v.unsqueeze(1)).exp_()
    torch.mv(E, torch.ones(m, dtype=Z.dtype), out=v)
    if not bool(v.max() < math.inf):
        return torch.softmax(Z, dim=1)
    return E.div_(v.unsqueeze(1))


def _dot(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Inner product of two contiguous fp32 arrays, in NumPy (~2x less per-call cost than torch's
    here)."""
    a = a.numpy() if isinstance(a, torch.Tensor) else a  # a view: no copy
    b = b.numpy() if isinstance(b, torch.Tensor) else b
    return float(np.dot(a.reshape(-1), b.reshape(-1)))


@dataclass
class _HookSolve:
    W: np.ndarray  # (d, m) float64, standardized units
    b: np.ndarray  # (m,) float64
    Z: torch.Tensor  # (n, m) fp32 train decision values at (W, b)
    grad_norm: float  # exact gradient inf-norm / (C n)
    n_iter: int  # L-BFGS iterations
    n_low: int  # of which run on bf16 data
    n_checks: int = 0  # exact checks of bf16 figures


class _HookLBFGS:
    """L-BFGS on one hook: ``min 0.5/(C n) ||W||^2 + loss / n`` (scikit-learn's scaled lbfgs objective).

    Variables ``W = P V``, ``b = bscale * beta`` (``P (d, d)`` a preconditioner or None). ``T (n, m)``
    one-hot targets (``m = 1``: 0/1 targets of a binary logistic); ``target (n, 1)`` class codes
    for the multinomial case (None when binary).

    Every iteration touches the data exactly twice: ``X D`` for the search direction
    (:meth:`iterate`) and ``X^T R`` for the new gradient (:meth:`gradient`). The line search
    (:meth:`line_search`, safeguarded Newton on the convex 1-D function) runs on ``Z + alpha X D``:
    no data passes. Only the ``(n, m)`` work is done in torch (a handful of calls per iteration);
    the ``(d, m)`` algebra, the inner products and the L-BFGS recursion (:meth:`direction`) run in
    NumPy, where a call costs less (in-process A/B: 1.08x at d = 576, neutral at d = 128).

    With bf16 data (``data.low``: AMX GEMMs, 2-4x faster than fp32 here) the solve runs on it
    until the gradient passes ``tol``; then decision values and gradient are recomputed from
    the fp32 rows (:meth:`exact_state`) and the solve stops, or goes on (:meth:`certify`): on bf16
    data from the exact decision values with a tighter bf16 target, or on fp32 copies when bf16's
    error leaves no room. The stopping test is always on exact figures.
    """

    def __init__(self, data: _HookData, T: torch.Tensor, target: torch.Tensor | None, C: float,
                 P: np.ndarray | None, bscale: float, tol: float, max_iter: int, memory: int, c2: float,
                 max_ls: int) -> None:
        self.data, self.T, self.P, self.bscale = data, T, P, bscale
        self.tol, self.max_iter, self.memory, self.c2, self.max_ls = tol, max_iter, memory, c2, max_ls
        self.n, self.d, self.m = data.n, data.d, T.shape[1]
        self.binary = target is None
        self.inv = 1.0 / (C * self.n)
        self.t_sum = T.sum(dim=0).double().numpy()
        self.r_bufs: dict = {}
        self.W = self.b = np.empty(0)
        self.n_iter = self.n_low = self.n_checks = 0
        self.low_tol = tol  # bf16 figures at or below it call for an exact check
        self.next_check = max_iter  # ... and so does this iteration (bf16 may stall above a tightened low_tol)
        self.hist: list[tuple[np.ndarray, np.ndarray, float]] = []
        self.gamma = 1.0

    # ---- figures at the current point ---------------------------------------------------------

    def probs(self, Z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(Z) if self.binary else _softmax_rows(Z)

    def gradient(self, prob: torch.Tensor, G: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
        """``(gW, gb, inf-norm)`` at probabilities ``prob``; ``G = X^T (prob - T)`` if already known."""
        data = self.data
        rsum = prob.sum(dim=0).double().numpy() - self.t_sum
        if G is None:  # the residual goes straight into the GEMM's dtype: one pass
            R = self.r_bufs.get(data.dtype)
            if R is None:
                R = self.r_bufs[data.dtype] = torch.empty(self.n, self.m, dtype=data.dtype)
            G = data.grad(torch.sub(prob, self.T, out=R), rsum)
        gW = G / self.n + self.inv * self.W
        gb = rsum / self.n
        return gW, gb, max(float(np.abs(gW).max()), float(np.abs(gb).max()))

    def exact_state(self) -> tuple:
        """``(Z, prob, gW, gb, gnorm)`` at ``(W, b)`` from the fp32 rows (the stopping test's figures)."""
        if self.data.low:
            Z = torch.empty(self.T.shape)
            G = self.data.exact_grad(Z, self.T, self.probs, self.W, self.b)
            prob = self.probs(Z)
            return (Z, prob, *self.gradient(prob, G))
        Z = self.data.fwd(self.W, self.b)
        prob = self.probs(Z)
        return (Z, prob, *self.gradient(prob))

    def to_v(self, gW: np.ndarray, gb: np.ndarray) -> np.ndarray:
        """The gradient in the solver's variables, flat float64."""
        d, m, P = self.d, self.m, self.P
        v = np.empty((d + 1) * m)
        v[: d * m] = (P.T @ gW if P is not None else gW).reshape(-1)
        v[d * m:] = self.bscale * gb
        return v

    def certify(self) -> tuple[tuple, bool]:
        """bf16 figures passed ``low_tol``: exact figures at the same point decide.

        -> ``(figures, exact)``: the exact figures if they pass ``tol`` (or the solve leaves bf16
        data: then on fp32 copies). Otherwise the solve goes on with bf16 data from the exact
        decision values (which drop the drift ``Z + alpha X D`` picked up from bf16-rounded
        products) and the bf16 gradient there, until that is below ``tol`` less 1.5 times its
        measured gap to the exact one (X's rounding: ~1e-5 here), or for 10 iterations at most.
        Falls back to fp32 data when that gap leaves no room, or after six checks.
        """
        tol = self.tol
        self.n_checks += 1
        ex = self.exact_state()
        if ex[4] <= tol or not self.data.low:
            return ex, True
        gWl, gbl, gnl = self.gradient(ex[1])  # bf16 gradient at the exact decision values
        err = float(max(np.abs(ex[2] - gWl).max(), np.abs(ex[3] - gbl).max()))
        if self.n_checks < 6 and err < 0.5 * tol:
            self.low_tol = min(self.low_tol, tol - 1.5 * err, 0.9 * gnl)
            self.next_check = self.n_iter + 10
            return (ex[0], ex[1], gWl, gbl, gnl), False
        self.data.to_exact()
        return ex, True

    def start(self, W0: np.ndarray, b0: np.ndarray, exact_first: bool) -> tuple[tuple, bool]:
        """Figures at the start ``(W0, b0)`` and whether they are exact (fp32)."""
        data, tol = self.data, self.tol
        self.W, self.b = np.array(W0, dtype=np.float64), np.array(b0, dtype=np.float64)
        if exact_first:  # a warm start may already be within tol on the exact figures
            fig = self.exact_state()
            exact = True
            if fig[4] > tol and data.low:  # go on from bf16 figures at the same point
                Z = data.fwd(self.W, self.b)
                prob = self.probs(Z)
                fig = (Z, prob, *self.gradient(prob))
                exact = False
                self.low_tol = min(tol, 0.9 * fig[4])
        else:
            if self.W.any():
                Z = data.fwd(self.W, self.b)
            else:  # a cold start: X 0 + b needs no pass over the data
                Z = torch.from_numpy(self.b.astype(np.float32)).expand(self.n, self.m).clone()
            prob = self.probs(Z)
            fig = (Z, prob, *self.gradient(prob))
            exact = not data.low  # are the figures from fp32 data?
        if not exact and fig[4] <= self.low_tol:
            fig, exact = self.certify()
        return fig, exact

    # ---- one iteration ------------------------------------------------------------------------

    def direction(self, g: np.ndarray) -> np.ndarray:
        """The L-BFGS search direction ``-H g`` (two-loop recursion, BLAS level 1, in place)."""
        q = g.copy()
        alphas = []
        for s_, y_, rho in reversed(self.hist):
            a = rho * ddot(s_, q)
            alphas.append(a)
            daxpy(y_, q, a=-a)
        q *= self.gamma
        for (s_, y_, rho), a in zip(self.hist, reversed(alphas)):
            daxpy(s_, q, a=a - rho * ddot(y_, q))
        return np.negative(q, out=q)

    def line_search(self, Z: torch.Tensor, XD: torch.Tensor, txd: float, d0: float, wdw: float,
                    dwdw: float) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Safeguarded Newton steps on ``phi(alpha)`` along ``Z + alpha X D`` (no data pass).

        Stops at the strong-Wolfe curvature condition ``|phi'| <= c2 |phi'(0)|`` or after
        ``max_ls`` trials. Returns ``(alpha, Z_alpha, probs(Z_alpha))``.
        """
        inv, n, binary, max_ls = self.inv, self.n, self.binary, self.max_ls
        alpha, lo, hi = 1.0, 0.0, math.inf
        for ls in range(max_ls):
            Za = torch.add(Z, XD, alpha=alpha)
            pa = self.probs(Za)
            phi1 = inv * (wdw + alpha * dwdw) + (_dot(pa, XD) - txd) / n
            if abs(phi1) <= self.c2 * abs(d0) or ls == max_ls - 1:
                break
            pxd = pa * XD
            if binary:
                curv = _dot((1 - pa) * pxd, XD)
            else:
                curv = _dot(pxd, XD) - float(pxd.sum(dim=1).square().sum())
            phi2 = inv * dwdw + curv / n
            if phi1 < 0:
                lo = alpha
            else:
                hi = alpha
            newt = alpha - phi1 / max(phi2, 1e-30)
            if not lo < newt < hi:
                newt = 4 * alpha if math.isinf(hi) else 0.5 * (lo + hi)
            alpha = newt
        return alpha, Za, pa

    def remember(self, step: np.ndarray, g_new: np.ndarray, g: np.ndarray) -> None:
        """Keep the curvature pair ``(s, y)`` if it is positive enough (at most ``memory`` pairs)."""
        y_ = g_new - g
        sy, yy = ddot(step, y_), ddot(y_, y_)
        if sy > 1e-10 * yy:
            self.hist.append((step, y_, 1.0 / sy))
            self.gamma = sy / yy
            if len(self.hist) > self.memory:
                self.hist.pop(0)

    def forget(self) -> None:
        self.hist.clear()
        self.gamma = 1.0

    def solve(self, W0: np.ndarray, b0: np.ndarray, exact_first: bool) -> _HookSolve:
        """Iterate from ``(W0, b0)`` until exact figures pass ``tol`` or ``max_iter`` is reached."""
        data, tol, n, d, m, P = self.data, self.tol, self.n, self.d, self.m, self.P
        (Z, prob, gW, gb, gnorm), exact = self.start(W0, b0, exact_first)
        g = self.to_v(gW, gb)
        while (not exact or gnorm > tol) and self.n_iter < self.max_iter:  # bf16 figures never stop it
            D = self.direction(g)
            DV = D[: d * m].reshape(d, m)
            DW = P @ DV if P is not None else DV
            Db = self.bscale * D[d * m:]
            XD = data.fwd(DW, Db)
            wdw, dwdw = float(np.vdot(self.W, DW)), float(np.vdot(DW, DW))
            # (P - T) . XD, with T . XD (the true classes' entries) fixed along the line
            txd = _dot(self.T, XD)
            d0 = self.inv * wdw + (_dot(prob, XD) - txd) / n
            if not d0 < 0:  # rounding made the direction uphill
                if data.low:  # bf16 data cannot go further: exact figures, then fp32 data if needed
                    Z, prob, gW, gb, gnorm = self.exact_state()
                    exact = True
                    if gnorm > tol:
                        data.to_exact()
                    g = self.to_v(gW, gb)
                    self.forget()
                    continue
                if not self.hist:
                    break  # steepest descent is not downhill: at the optimum to rounding
                self.forget()
                continue
            alpha, Z, prob = self.line_search(Z, XD, txd, d0, wdw, dwdw)
            self.W += alpha * DW
            self.b += alpha * Db
            was_low = data.low
            gW, gb, gnorm = self.gradient(prob)
            self.n_iter += 1
            self.n_low += int(was_low)
            exact = not was_low
            checked = was_low and (gnorm <= self.low_tol or self.n_iter >= self.next_check)
            if checked:
                (Z, prob, gW, gb, gnorm), exact = self.certify()
            gn = self.to_v(gW, gb)
            if not checked:  # no curvature pair across a check (new precision or decision values)
                self.remember(D * alpha, gn, g)
            g = gn
        if not exact:  # stopped by max_iter on bf16 data: report exact figures
            Z, prob, gW, gb, gnorm = self.exact_state()
        return _HookSolve(W=self.W, b=self.b, Z=Z, grad_norm=gnorm, n_iter=self.n_iter, n_low=self.n_low,
                          n_checks=self.n_checks)


def _lbfgs_hook(
    data: _HookData,
    T: torch.Tensor,
    target: torch.Tensor | None,
    C: float,
    W0: np.ndarray,
    b0: np.ndarray,
    *,
    P: np.ndarray | None,
    bscale: float,
    tol: float,
    max_iter: int,
    exact_first: bool = False,
    memory: int = 10,
    c2: float = 0.5,
    max_ls: int = 6,
) -> _HookSolve:
    """Fit one hook with :class:`_HookLBFGS` from ``W0 (d, m)``, ``b0 (m,)`` (NumPy).

    ``exact_first``: start with the exact figures (a warm start that is already within ``tol``
    then costs no iteration).
    """
    solver = _HookLBFGS(data, T, target, C, P, bscale, tol, max_iter, memory, c2, max_ls)
    return solver.solve(W0, b0, exact_first)


_PARALLEL_WORK = 2e5  # training values per hook above which hooks go to worker threads
_BF16_MIN_FEATURES = 256  # "auto" precision uses bf16 data passes from this width on


def _hook_arrays(
    X_by_hook: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray, y: np.ndarray, rows: np.ndarray | None,
) -> tuple[list[str], dict, tuple[int, int], np.ndarray, np.ndarray | None]:
    """Checked inputs: ``(hooks, {hook: array}, (stored rows, d), y, rows)``."""
    if isinstance(X_by_hook, Mapping):
        hooks = list(X_by_hook.keys())
        arrays = dict(X_by_hook)
    else:
        seq = list(X_by_hook)
        hooks = [f"hook_{i}" for i in range(len(seq))]
        arrays = dict(zip(hooks, seq))
    if not hooks:
        raise ProbeError("no hooks given; pick at least one hook to probe.")
    shapes = {tuple(np.shape(a_)) for a_ in arrays.values()}
    if len(shapes) != 1:
        raise ProbeError(f"all hooks need the same (samples, features) shape; got {sorted(shapes)}.")
    shape = shapes.pop()
    if len(shape) != 2 or 0 in shape:
        raise ProbeError(f"features must be 2-D (samples × features) and non-empty; got shape {shape}.")
    y = np.asarray(y)
    n_rows = shape[0] if rows is None else len(rows)
    if y.ndim != 1 or y.shape[0] != n_rows:
        raise ProbeError(f"labels must be 1-D with one entry per sample; got {y.shape} for {n_rows} samples.")
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= shape[0]):
            raise ProbeError(f"rows must index the {shape[0]} stored rows; got {rows.min()}..{rows.max()}.")
    return hooks, arrays, shape, y, rows


@dataclass
class _Problem:
    """What every hook's fit shares: the split, the targets and the solver settings."""

    codes: np.ndarray  # (n,) class codes of the samples
    classes: np.ndarray
    tr: np.ndarray  # sorted sample indices of the split
    te: np.ndarray
    tr_rows: torch.Tensor  # the rows of the arrays they read
    te_rows: torch.Tensor
    T: torch.Tensor  # (ntr, m) one-hot targets (0/1 column when binary)
    target: torch.Tensor | None  # (ntr, 1) class codes (None when binary)
    b_prior: np.ndarray  # (m,) the intercept that is optimal at W = 0 (log class priors)
    s: float  # softmax curvature estimate for the preconditioner
    C: float
    standardize: bool
    mixed: bool
    precondition: bool
    eig_cache: dict | None
    split_key: tuple
    tol: float
    max_iter: int

    @property
    def binary(self) -> bool:
        return self.target is None

    def accuracy(self, Z: torch.Tensor, truth: np.ndarray) -> float:
        """Share of rows whose top decision value is the true class (NumPy's argmax: faster
        than torch's over 16 columns here)."""
        z = Z.numpy()
        pred = (z[:, 0] > 0).astype(np.int64) if self.binary else z.argmax(axis=1)
        return float((pred == truth).mean())

    def preconditioner(self, h: str, data: _HookData) -> np.ndarray | None:
        """``U (s Λ + 1/(C n))^(-1/2)`` from the hook's (cached) covariance eigendecomposition."""
        if not self.precondition:
            return None
        key = (h, self.split_key)
        cached = self.eig_cache.get(key) if self.eig_cache is not None else None
        ev, U = cached if cached is not None else _hook_eigs(data)
        if self.eig_cache is not None and cached is None:
            self.eig_cache[key] = (ev, U)
        return (U * torch.rsqrt(self.s * ev + 1.0 / (self.C * self.tr.size)).unsqueeze(0)).double().numpy()

    def fit_hook(self, h: str, a_: np.ndarray, start: tuple[np.ndarray, np.ndarray] | None, bufs: dict) -> tuple:
        """Gather, standardize and fit one hook; ``start``: a warm start ``(W0 (d, m), b0 (m,))``.

        Returns ``(coef (m, d) fp32, intercept (m,) fp32, train acc, test acc, grad norm, iterations)``.
        """
        with torch.no_grad():
            try:
                data = _HookData(a_, self.tr_rows, self.standardize, self.mixed, bufs)
            except _NonFinite:
                raise ProbeError(f"features of hook {h!r} contain NaN or inf; re-extract them in float32.") from None
            P = self.preconditioner(h, data)
            W0, b0 = start if start is not None else (np.zeros((data.d, self.T.shape[1])), self.b_prior)
            # With P the W-curvature is ~1, so scale the intercept (curvature ~s) to match; without
            # it both are ~s already (standardized features).
            sol = _lbfgs_hook(data, self.T, self.target, self.C, W0, b0, P=P,
                              bscale=self.s ** -0.5 if P is not None else 1.0, tol=self.tol,
                              max_iter=self.max_iter, exact_first=start is not None)
            tr_acc = self.accuracy(sol.Z, self.codes[self.tr])
            Zte = data.predict_rows(self.te_rows, sol.W, sol.b)
            if not bool(torch.isfinite(Zte).all()):
                raise ProbeError(f"features of hook {h!r} contain NaN or inf; re-extract them in float32.")
            te_acc = self.accuracy(Zte, self.codes[self.te]) if self.te.size else float("nan")
        return (sol.W.T.astype(np.float32), sol.b.astype(np.float32), tr_acc, te_acc, sol.grad_norm, sol.n_iter)


def fit_multiclass_all_hooks(
    X_by_hook: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray,
    y: np.ndarray,
    *,
    C: float = 1.0,
    test_fraction: float = 0.3,
    seed: int = 0,
    standardize: bool = True,
    precondition: bool = False,
    eig_cache: dict | None = None,
    tol: float = 1e-4,
    max_iter: int = 200,
    warm_start: LayerProbeResult | None = None,
    precision: str = "auto",
    curvature: float | None = None,
    progress: Callable[[float, str], None] | None = None,
    rows: np.ndarray | None = None,
) -> LayerProbeResult:
    """L2 logistic probe (multinomial, or logistic for two classes) on every hook.

    Minimizes, per hook, ``0.5 ||W_h||^2 + C * sum_i loss`` (scikit-learn's lbfgs objective,
    intercept unpenalized) with an L-BFGS per hook (:class:`_HookLBFGS`), hooks spread over
    worker threads, one per core, each single-threaded (:func:`probing_core.threads.map_hooks`;
    ``PROBING_THREADS`` sets their number). A hook's data is gathered, standardized and fitted
    by one worker and then dropped, so at most ``workers + 1`` hooks are in memory.

    With ``precondition`` the variables are ``W = U (s Λ + 1/(C n))^(-1/2) V`` (U, Λ: the hook's
    feature covariance eigendecomposition, s: a softmax curvature estimate), the inverse square
    root of an approximation of the Hessian, so both the data term and the penalty are close to
    the identity. That helps on ill-conditioned activations; on well-conditioned ones it saves
    little, and at d≈576 the decomposition costs more than it saves unless it is cached
    (``eig_cache``), so it is off by default.

    Args:
        X_by_hook: ``{hook: (n, d)}`` or ``(H, n, d)``; every hook needs the same n and d.
        y: ``(n,)`` labels.
        C: inverse L2 strength (> 0).
        test_fraction, seed: stratified split.
        standardize: per-hook standardization on the training split.
        precondition: use the eigendecomposition preconditioner.
        eig_cache: dict filled with / read from ``{(hook, key): (evals, evecs)}``; keep it next to
            the activations so a new label or C costs no decomposition. It is only a
            preconditioner: a stale entry (e.g. a label change moved the split) slows the fit
            but never changes the optimum.
        tol: stop a hook when the inf-norm of its gradient w.r.t. (W, b) divided by ``C n`` (the
            scaling and default of scikit-learn's lbfgs ``tol``) is ``<= tol``, measured on the
            fp32 data; ``converged`` is that norm being ``<= 10 * tol``.
        max_iter: L-BFGS iterations per hook.
        warm_start: a previous result on the same data/hooks (e.g. after a C slider move or a
            label change with the same classes).
        precision: ``"mixed"`` runs the data passes on a bf16 copy of X until a hook is within
            ``tol``, then checks (and if needed finishes) on fp32 (same optimum and stopping
            test); ``"fp32"`` never uses bf16; ``"auto"`` picks mixed where the CPU has native
            bf16 GEMMs and hooks have at least 256 features.
        curvature: the softmax curvature ``s`` of the preconditioner (default ``1/m`` for m > 2
            classes, 1/4 for two).
        progress: ``progress(fraction, message)`` once per hook, on the calling thread.
        rows: sample ``i`` is row ``rows[i]`` of every array (e.g. store memmaps, read in place
            and never copied whole); ``y`` then has one entry per row. ``train_idx`` /
            ``test_idx`` index samples (positions in ``rows``).

    Returns:
        :class:`LayerProbeResult` (``n_iter``: the most iterations any hook took).

    Raises:
        ProbeError, LabelError: see :func:`validate_xy` (NaN or inf in a hook's features is
            reported with the hook's name); hooks of different shapes; unknown precision.
    """
    import time

    t0 = time.perf_counter()
    C_val = float(check_Cs(C)[0])
    if precision not in ("auto", "mixed", "fp32"):
        raise ProbeError(f"precision={precision!r} is not one of 'auto', 'mixed', 'fp32'; use 'auto'.")
    hooks, arrays, shape, y, rows = _hook_arrays(X_by_hook, y, rows)
    codes, classes = check_labels(y, min_per_class=2)
    tr, te = stratified_split(codes, test_fraction=test_fraction, seed=seed)
    tr, te = np.sort(tr), np.sort(te)  # ascending gathers; the order does not change the optimum
    H, n, d = len(hooks), y.shape[0], shape[1]
    binary = classes.size == 2
    m = 1 if binary else classes.size
    ctr = torch.as_tensor(codes[tr])
    T = (ctr == 1).float().view(-1, 1) if binary else torch.nn.functional.one_hot(ctr, m).float()
    prior = T.mean(dim=0).clamp(min=1e-12)
    problem = _Problem(
        codes=codes, classes=classes, tr=tr, te=te,
        tr_rows=torch.as_tensor(tr if rows is None else rows[tr]),
        te_rows=torch.as_tensor(te if rows is None else rows[te]),
        T=T, target=None if binary else ctr.view(-1, 1),
        b_prior=(torch.log(prior / (1 - prior)) if binary else prior.log() - prior.log().mean()).double().numpy(),
        s=float(curvature) if curvature is not None else (0.25 if binary else 1.0 / m),
        C=C_val, standardize=standardize,
        # bf16 passes pay for their exact fp32 check from d ≈ 256 on (bench_layers: at d = 128 fp32
        # was as fast or faster, at d = 576 bf16 1.3-1.4x faster).
        mixed=precision == "mixed" or (precision == "auto" and d >= _BF16_MIN_FEATURES and _bf16_matmul_is_fast()),
        precondition=precondition, eig_cache=eig_cache,
        split_key=(int(seed), float(test_fraction), bool(standardize), n, d), tol=tol, max_iter=max_iter,
    )
    warm = warm_start is not None and warm_start.coefs.shape == (H, m, d)
    index = {h: i for i, h in enumerate(hooks)}
    scratch: dict[int, dict] = {}  # per worker thread, freed with this call

    def one(h: str, a_: np.ndarray) -> tuple:
        bufs = scratch.setdefault(threading.get_ident(), {})
        start = None
        if warm:
            i = index[h]
            start = (np.asarray(warm_start.coefs[i], dtype=np.float64).T,
                     np.asarray(warm_start.intercepts[i], dtype=np.float64))
        # Confident softmax outputs underflow to subnormals, 10x slower to compute with on x86;
        # flush them to zero on this thread while it fits (no figure here is that small).
        torch.set_flush_denormal(True)
        try:
            return problem.fit_hook(h, a_, start, bufs)
        finally:
            torch.set_flush_denormal(False)

    with single_threaded():
        outs = map_hooks(one, hooks, arrays, parallel=tr.size * d >= _PARALLEL_WORK, progress=progress)
    rel = np.array([o[4] for o in outs], dtype=np.float64)
    counts = {
        (classes[i].item() if hasattr(classes[i], "item") else classes[i]): {
            "train": int((codes[tr] == i).sum()), "test": int((codes[te] == i).sum())}
        for i in range(classes.size)
    }
    chance = float(np.bincount(codes[te], minlength=classes.size).max() / te.size)
    return LayerProbeResult(
        hooks=hooks, classes=classes, class_counts=counts,
        train_accuracy=np.array([o[2] for o in outs]), test_accuracy=np.array([o[3] for o in outs]),
        chance=chance, C=C_val, coefs=np.stack([o[0] for o in outs]), intercepts=np.stack([o[1] for o in outs]),
        grad_norm=rel, converged=rel <= 10 * tol, n_iter=max(o[5] for o in outs), train_idx=tr, test_idx=te,
        fit_seconds=time.perf_counter() - t0,
    )
