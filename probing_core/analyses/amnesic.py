"""Interventions on the cached dataset: LM loss with and without an ablation, and amnesic probing.

Amnesic probing (INLP-style, Ravfogel et al. 2020; Elazar et al. 2021): fit a probe, project its
direction out of the activations, repeat k times; after each removal measure a fresh probe at the
same hook, the LM loss with the projections applied inside the forward pass, and a fresh probe at
a later hook on activations recomputed with them — against the same number of random directions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from probing_core.analyses.interventions import (
    ControlComparison,
    Direction,
    Intervention,
    Progress,
    _Batch,
    _forward,
    _hook_fn,
    _null,
    _rows_batch,
    check_direction,
    check_intervention,
    check_k_controls,
    compare_with_controls,
    position_mask,
    random_directions,
)
from probing_core.errors import InputError
from probing_core.models import LoadedModel, as_numpy
from probing_core.store.activations import CachedActivations


# ---------------------------------------------------------------------------------------------
# On the cached dataset: LM loss, downstream probes, amnesic probing
# ---------------------------------------------------------------------------------------------


def entry_token_rows(acts: CachedActivations, max_rows: int | None = None, seqs: np.ndarray | None = None) -> list[np.ndarray]:
    """The entry's token rows (BOS first when it was prepended) rebuilt from its token table."""
    order = np.lexsort((acts.pos, acts.seq))
    seq, ids = acts.seq[order], acts.token_ids[order]
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    bounds = list(zip(starts, np.r_[starts[1:], seq.size]))
    rows = {int(seq[s]): ids[s:e].astype(np.int64) for s, e in bounds}
    keys = sorted(rows) if seqs is None else [int(s) for s in seqs]
    if max_rows is not None:
        keys = keys[:max_rows]
    return [rows[k] for k in keys]


def _mean_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[batch] mean next-token cross-entropy of each row (nats)."""
    lp = logits[:, :-1].log_softmax(-1)
    return -lp.gather(-1, ids[:, 1:, None].expand(logits.shape[0], -1, 1))[..., 0].mean(-1)


@dataclass
class _ProjectOut:
    """Hook removing the span of an orthonormal basis Q [k, width] at every position but BOS."""

    Q: torch.Tensor
    skip_first: bool

    def __call__(self, x: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if self.Q.shape[0] == 0:
            return x
        Q = self.Q.to(x.dtype)
        y = x - (x @ Q.T) @ Q
        if self.skip_first:
            y[:, 0] = x[:, 0]
        return y


def _loss_with(model: LoadedModel, rows: list[np.ndarray], hook: str | None, fn: Callable | None) -> float:
    tot, n = 0.0, 0
    bridge = model.bridge
    for r in rows:
        t = torch.from_numpy(r)[None].to(model.device)
        with model.lock, torch.inference_mode():
            if fn is None:
                lg = bridge(t)
            else:
                with bridge.hooks(fwd_hooks=[(hook, fn)]):
                    lg = bridge(t)
        tot += float(_mean_nll(lg.float(), t)[0]) * (r.size - 1)
        n += r.size - 1
    return tot / max(n, 1)


@dataclass(frozen=True)
class LossEffect:
    """Mean next-token cross-entropy on cached rows with and without an intervention, vs random controls.

    Attributes:
        base, after: loss (nats/token) without and with the intervention.
        control: [K] loss with the same intervention along each random direction.
        comparison: of (after − base) against (control − base).
        n_rows, n_tokens: what was scored.
    """

    base: float
    after: float
    control: np.ndarray
    comparison: ControlComparison
    n_rows: int
    n_tokens: int

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "after": self.after, "control": self.control.tolist(), "n_rows": self.n_rows,
                "n_tokens": self.n_tokens, "comparison": self.comparison.to_json()}


def loss_effect(model: LoadedModel, acts: CachedActivations, direction: Direction, iv: Intervention, *,
                n_rows: int = 8, k_controls: int = 10, seed: int = 0, progress: Progress | None = None) -> LossEffect:
    """LM loss on the entry's first ``n_rows`` token rows with and without ``iv``, and along K random controls.

    Each row runs once as a batch of 2 + K copies (bare, probe, controls); positions follow ``iv.positions``.

    Raises:
        InputError: the entry was made with another model, K out of range, …
    """
    check_direction(model, direction)
    check_intervention(direction, iv)
    K = check_k_controls(k_controls)
    if acts.meta.get("model_key") != model.key:
        raise InputError("this cache entry was built with another model; pick an entry of the loaded model.")
    rows = [r for r in entry_token_rows(acts, n_rows) if r.size >= 2]
    if not rows:
        raise InputError("the entry has no row of two or more tokens to score.")
    base = np.zeros(len(rows)); probe = np.zeros(len(rows)); ctrl = np.zeros((K, len(rows)))
    for i, r in enumerate(rows):
        t = torch.from_numpy(r)[None]
        mask = position_mask(model, r.tolist(), iv.positions)
        b = _rows_batch(model, direction, iv, mask, controls=K, seed=seed)
        b = _Batch(b.kind, torch.cat([b.mask[:1] & False, b.mask]), *(None if v is None else torch.cat([v[:1], v])
                                                                      for v in (b.dirs, b.amount, b.idx, b.vals)))
        nll = as_numpy(_mean_nll(_forward(model, t.expand(K + 2, -1), direction.hook, b), t.expand(K + 2, -1)))
        base[i], probe[i], ctrl[:, i] = nll[0], nll[1], nll[2:]
        if progress:
            progress((i + 1) / len(rows), f"LM loss: row {i + 1}/{len(rows)}")
    w = np.array([r.size - 1 for r in rows], np.float64)
    avg = lambda a: float((a * w).sum(-1) / w.sum()) if a.ndim == 1 else (a * w).sum(-1) / w.sum()  # noqa: E731
    b0, p0, c0 = avg(base), avg(probe), avg(ctrl)
    return LossEffect(b0, p0, np.asarray(c0), compare_with_controls(p0 - b0, np.asarray(c0) - b0, metric="Δ LM loss (nats/token)",
                                                                      seed=seed), len(rows), int(w.sum()))


def _fresh_probe_score(X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> float:
    """Test accuracy of a fresh L2 logistic probe (standardized features, C = 1)."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = X[train].mean(0), X[train].std(0)
    sd[sd < 1e-6] = 1.0
    clf = LogisticRegression(C=1.0, max_iter=1000)
    clf.fit((X[train] - mu) / sd, y[train])
    return float(clf.score((X[test] - mu) / sd, y[test]))


def _split(y: np.ndarray, seed: int, test_fraction: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    from probing_core.solvers.splits import stratified_split

    return stratified_split(y, test_fraction=test_fraction, seed=seed)


def _orth_add(Q: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Append w's unit component orthogonal to the rows of Q (Gram–Schmidt, twice for stability)."""
    v = w.astype(np.float64)
    for _ in range(2):
        v = v - Q.T @ (Q @ v) if Q.size else v
    n = np.linalg.norm(v)
    if n < 1e-10:
        return Q
    return np.vstack([Q, (v / n)[None]]) if Q.size else (v / n)[None]


def _hook_acts(model: LoadedModel, rows: list[np.ndarray], hook: str, later: str, fn: Callable | None,
               positions: list[np.ndarray]) -> np.ndarray:
    """Activations at ``later`` at the given positions of each row, with ``fn`` attached at ``hook``."""
    out = []
    bridge = model.bridge
    for r, pos in zip(rows, positions):
        t = torch.from_numpy(r)[None].to(model.device)
        with model.lock, torch.inference_mode():
            ctx = bridge.hooks(fwd_hooks=[(hook, fn)]) if fn is not None else _null()
            with ctx:
                _, cache = bridge.run_with_cache(t, names_filter=lambda n: n == later)
            out.append(as_numpy(cache[later][0, pos]))
    return np.concatenate(out)


@dataclass(frozen=True)
class AmnesicResult:
    """INLP-style amnesic probing: fit a probe, project its direction out, repeat.

    Attributes:
        hook: where directions were removed; later_hook: where the downstream probe read (or None).
        k: [n_k] 0, 1, …, k_max directions removed.
        probe_acc: [n_k] a fresh probe's test accuracy at ``hook`` after removing k probe directions.
        control_acc: [n_k] the same after removing k random directions.
        loss, control_loss: [n_k] LM loss (nats/token) on the entry's first rows with those projections.
        downstream_acc, control_downstream_acc: [n_k] a fresh probe at ``later_hook`` (NaN when not asked).
        chance: the majority-class rate of the test rows.
        seconds_per_iteration: wall time of one "fit → project → re-measure" step.
        seconds_fit_and_pass: one plain probe fit plus one pass over the stored activations (for comparison).
    """

    hook: str
    later_hook: str | None
    k: np.ndarray
    probe_acc: np.ndarray
    control_acc: np.ndarray
    loss: np.ndarray
    control_loss: np.ndarray
    downstream_acc: np.ndarray
    control_downstream_acc: np.ndarray
    chance: float
    seconds_per_iteration: float
    seconds_fit_and_pass: float
    seed: int

    def rows(self) -> list[dict[str, Any]]:
        return [{"k": int(k), "probe_acc": float(a), "random_acc": float(ca), "loss": float(lo), "random_loss": float(cl),
                 "downstream_acc": float(d), "random_downstream_acc": float(cd)}
                for k, a, ca, lo, cl, d, cd in zip(self.k, self.probe_acc, self.control_acc, self.loss, self.control_loss,
                                                   self.downstream_acc, self.control_downstream_acc)]


def amnesic_probing(
    model: LoadedModel,
    acts: CachedActivations,
    hook: str,
    rows: np.ndarray,
    y: np.ndarray,
    *,
    k_max: int = 5,
    later_hook: str | None = None,
    n_loss_rows: int = 4,
    seed: int = 0,
    progress: Progress | None = None,
) -> AmnesicResult:
    """Fit a probe at ``hook``, project its direction out of the activations, repeat ``k_max`` times.

    After each removal: a fresh probe's accuracy at ``hook`` (stored activations, projected), the LM
    loss with the projections applied in the forward pass (``n_loss_rows`` cached rows), and —
    with ``later_hook`` — a fresh probe at that later hook on activations recomputed with the
    projections in place. The same with k random directions is the control.

    Args:
        rows: [n] rows of the entry's token table; y: [n] class labels for them.

    Raises:
        InputError / ProbeError: k_max outside 1…20, one-class label, later hook not after hook.
    """
    if not 1 <= int(k_max) <= 20:
        raise InputError(f"remove between 1 and 20 directions; got {k_max}.")
    if acts.meta.get("model_key") != model.key:
        raise InputError("this cache entry was built with another model; pick an entry of the loaded model.")
    model.check_hooks([hook])
    if later_hook is not None:
        model.check_hooks([later_hook])
        order = model.all_hook_names()
        if order.index(later_hook) <= order.index(hook):
            raise InputError(f"the downstream hook {later_hook!r} must come after {hook!r}.")
    X = np.asarray(acts.hook(hook)[rows], np.float32)
    codes = np.unique(np.asarray(y), return_inverse=True)[1]
    train, test = _split(codes, seed)
    chance = float(np.bincount(codes[test]).max() / test.size)
    t0 = time.perf_counter()
    _fresh_probe_score(X, codes, train, test)
    np.asarray(acts.hook(hook)).sum()  # one pass over the stored activations
    fit_and_pass = time.perf_counter() - t0
    loss_rows = entry_token_rows(acts, n_loss_rows)
    skip_bos = bool(acts.meta.get("has_bos"))
    later_rows = later_pos = None
    if later_hook is not None:
        seqs, inv = np.unique(acts.seq[rows], return_inverse=True)
        later_rows = entry_token_rows(acts, seqs=seqs)
        later_pos = [acts.pos[rows[inv == i]].astype(np.int64) for i in range(seqs.size)]
        # rows come back grouped by sequence: reorder the labels the same way
        codes_later = np.concatenate([codes[inv == i] for i in range(seqs.size)])
        tr_l, te_l = _split(codes_later, seed)
    R = random_directions(X.shape[1], k_max, seed)
    n_k = k_max + 1
    res = {n: np.full(n_k, np.nan) for n in ("acc", "cacc", "loss", "closs", "down", "cdown")}
    Q = np.zeros((0, X.shape[1]))
    Qr = np.zeros((0, X.shape[1]))
    t_iter = []
    for it in range(n_k):
        ts = time.perf_counter()
        if it > 0:
            Xp = X - (X @ Q.T) @ Q if Q.size else X
            w = _probe_direction(Xp[train], codes[train])
            Q = _orth_add(Q, w)
            Qr = _orth_add(Qr, R[it - 1])
        for name, basis in (("", Q), ("c", Qr)):
            Xp = X - (X @ basis.T) @ basis if basis.size else X
            res[name + "acc"][it] = _fresh_probe_score(Xp, codes, train, test)
            fn = _ProjectOut(torch.from_numpy(basis.astype(np.float32)).to(model.device), skip_bos) if basis.size else None
            res[name + "loss"][it] = _loss_with(model, loss_rows, hook, fn)
            if later_rows is not None:
                Xl = _hook_acts(model, later_rows, hook, later_hook, fn, later_pos)
                res[name + "down"][it] = _fresh_probe_score(Xl, codes_later, tr_l, te_l)
            if it == 0:
                for k2 in ("acc", "loss", "down"):
                    res["c" + k2][0] = res[k2][0]
                break
        if it > 0:
            t_iter.append(time.perf_counter() - ts)
        if progress:
            progress((it + 1) / n_k, f"amnesic probing: {it}/{k_max} directions removed")
    return AmnesicResult(hook, later_hook, np.arange(n_k), res["acc"], res["cacc"], res["loss"], res["closs"], res["down"],
                         res["cdown"], chance, float(np.mean(t_iter)), fit_and_pass, seed)


def _probe_direction(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The (raw-unit) weight vector of a fresh logistic probe; multiclass: the first singular direction of its weights."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = X.mean(0), X.std(0)
    sd[sd < 1e-6] = 1.0
    clf = LogisticRegression(C=1.0, max_iter=1000).fit((X - mu) / sd, y)
    W = clf.coef_ / sd
    if W.shape[0] == 1:
        return W[0]
    return np.linalg.svd(W, full_matrices=False)[2][0]


@dataclass(frozen=True)
class DownstreamResult:
    """A fresh probe at a later hook on activations recomputed with and without an intervention.

    Attributes:
        later_hook: where the probe reads. base, after: its test accuracy without / with the intervention.
        control: [K] the accuracy with the same intervention along each random direction.
        comparison: of (after − base) against (control − base). chance: majority-class rate of the test rows.
    """

    later_hook: str
    base: float
    after: float
    control: np.ndarray
    comparison: ControlComparison
    chance: float

    def to_json(self) -> dict[str, Any]:
        return {"later_hook": self.later_hook, "base": self.base, "after": self.after, "control": self.control.tolist(),
                "chance": self.chance, "comparison": self.comparison.to_json()}


def downstream_probe(model: LoadedModel, acts: CachedActivations, direction: Direction, iv: Intervention, rows: np.ndarray,
                     y: np.ndarray, later_hook: str, *, k_controls: int = 3, seed: int = 0,
                     progress: Progress | None = None) -> DownstreamResult:
    """Does the information survive downstream? Re-run the rows' sequences with the intervention (and along K
    random directions, one batch of 2 + K copies per sequence), read ``later_hook`` at the labelled positions
    and fit a fresh probe on each version.

    Args:
        rows: [n] rows of the entry's token table; y: [n] class labels.

    Raises:
        InputError: the later hook is not after the direction's hook, another model's entry, K out of range.
    """
    check_direction(model, direction)
    check_intervention(direction, iv)
    K = check_k_controls(k_controls)
    if acts.meta.get("model_key") != model.key:
        raise InputError("this cache entry was built with another model; pick an entry of the loaded model.")
    model.check_hooks([later_hook])
    order = model.all_hook_names()
    if order.index(later_hook) <= order.index(direction.hook):
        raise InputError(f"the downstream hook {later_hook!r} must come after {direction.hook!r}.")
    codes = np.unique(np.asarray(y), return_inverse=True)[1]
    seqs, inv = np.unique(acts.seq[rows], return_inverse=True)
    token_rows = entry_token_rows(acts, seqs=seqs)
    feats: list[list[np.ndarray]] = [[] for _ in range(K + 2)]
    labels = []
    bridge = model.bridge
    for i, r in enumerate(token_rows):
        pos = acts.pos[rows[inv == i]].astype(np.int64)
        labels.append(codes[inv == i])
        b = _rows_batch(model, direction, iv, position_mask(model, r.tolist(), iv.positions), controls=K, seed=seed)
        b = _Batch(b.kind, torch.cat([b.mask[:1] & False, b.mask]),
                   *(None if v is None else torch.cat([v[:1], v]) for v in (b.dirs, b.amount, b.idx, b.vals)))
        t = torch.from_numpy(r)[None].expand(K + 2, -1).to(model.device)
        with model.lock, torch.inference_mode():
            with bridge.hooks(fwd_hooks=[(direction.hook, _hook_fn(b))]):
                _, cache = bridge.run_with_cache(t, names_filter=lambda n: n == later_hook)
            a = as_numpy(cache[later_hook][:, pos])  # [K + 2, n_pos, width]
        for j in range(K + 2):
            feats[j].append(a[j])
        if progress:
            progress((i + 1) / len(token_rows), f"downstream probe: sequence {i + 1}/{len(token_rows)}")
    yy = np.concatenate(labels)
    train, test = _split(yy, seed)
    scores = np.array([_fresh_probe_score(np.concatenate(f), yy, train, test) for f in feats])
    chance = float(np.bincount(yy[test]).max() / test.size)
    return DownstreamResult(later_hook, float(scores[0]), float(scores[1]), scores[2:],
                            compare_with_controls(scores[1] - scores[0], scores[2:] - scores[0],
                                                  metric=f"Δ probe accuracy at {later_hook}", seed=seed), chance)
