"""Interventions along what a probe found: steer, ablate and patch neurons, against random controls.

A probe shows that information is decodable; an intervention asks whether the model uses it. This
module turns probe results into :class:`Direction` objects (a ridge or logistic weight vector, the
difference of class means, a set of MLP neurons), applies an :class:`Intervention` at one hook and
a set of positions through the bridge's hook context manager (every forward pass holds
``model.lock``), and measures the effect before vs after — always beside the same intervention
along ``K`` random directions of the same norm (or random neuron sets of the same size), run as one
batch of ``K`` copies of the prompt.

Conventions (documented choices):

* Steering adds ``c · σ · d̂`` where ``d̂`` is the unit direction and ``σ`` the standard deviation
  of the activations' projection on ``d̂`` over the rows the direction was made from, so ``c`` is
  in "standard deviations along d̂". A random control adds ``c · σ · r̂``: the same added vector
  norm along a random unit ``r̂`` (seeded Gaussian, normalized).
* Directional ablation sets ``x ← x − (x·d̂) d̂``; mean-ablation sets the projection to its dataset
  mean: ``x ← x − (x·d̂ − μ) d̂``. Their controls ablate random unit directions (mean-ablation uses
  the dataset mean activation, so ``μ_r = m̄·r̂``).
* Positions: ``all`` (every position but BOS), ``last``, ``last:N`` (the last N positions),
  ``match:TOK,TOK`` (positions whose token text is one of them; a leading space is kept) or
  ``idx:I,J``. During a greedy continuation the rule is applied again at every step.
* A control comparison reports the probe effect's percentile among the ``K`` control effects
  (ties count half), its z-score (control std with ddof = 1), and whether it lies inside the band
  ``[min, max]`` of the controls — "inside the band" means the probe direction did nothing a
  random direction of the same size would not do.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from probing_core.analyses import lens
from probing_core.analyses.directions import (  # noqa: F401 — re-exported: one import for pages and the CLI
    Direction,
    check_direction,
    direction_from_bytes,
    direction_to_bytes,
    load_direction,
    logistic_direction,
    mass_mean_direction,
    neuron_direction,
    projection_stats,
    ridge_direction,
    save_direction,
    weights_direction,
    with_stats_from,
)
from probing_core.errors import InputError
from probing_core.models import LoadedModel, as_numpy

Progress = Callable[[float, str], None]

#: Largest |c| accepted, in standard deviations along the direction.
C_MAX = 50.0
#: Most random controls in one comparison.
K_MAX = 256
KINDS = ("steer", "ablate", "mean_ablate", "neuron_zero", "neuron_mean", "neuron_value")
NEURON_KINDS = ("neuron_zero", "neuron_mean", "neuron_value")


# ---------------------------------------------------------------------------------------------
# Interventions and positions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Intervention:
    """What to do at the direction's hook.

    Attributes:
        kind: steer | ablate | mean_ablate | neuron_zero | neuron_mean | neuron_value.
        positions: all | last | last:N | match:TOK,TOK | idx:I,J (see the module docstring).
        coef: steering strength c in standard deviations along d̂ (|c| ≤ :data:`C_MAX`).
        value: the activation written into each neuron by ``neuron_value``.
    """

    kind: str = "steer"
    positions: str = "all"
    coef: float = 0.0
    value: float = 0.0

    def label(self) -> str:
        what = {"steer": f"steer c = {self.coef:+g} σ", "ablate": "project d̂ out", "mean_ablate": "projection set to its mean",
                "neuron_zero": "neurons zeroed", "neuron_mean": "neurons set to their mean",
                "neuron_value": f"neurons set to {self.value:g}"}.get(self.kind, self.kind)
        return f"{what} @ {self.positions}"


def kinds_for(direction: Direction) -> tuple[str, ...]:
    """The interventions that fit ``direction``: the neuron patches for a neuron set, else steer / ablate / mean-ablate."""
    return NEURON_KINDS if direction.is_neuron_set else ("steer", "ablate", "mean_ablate")


def check_intervention(direction: Direction, iv: Intervention) -> None:
    """Refuse an intervention that does not fit the direction.

    Raises:
        InputError: unknown kind, c or value out of range, a neuron kind on a direction (or back),
        missing statistics (σ for steering, μ for mean-ablation).
    """
    if iv.kind not in KINDS:
        raise InputError(f"unknown intervention {iv.kind!r}; choose one of {', '.join(KINDS)}.")
    if not (math.isfinite(iv.coef) and abs(iv.coef) <= C_MAX):
        raise InputError(f"c = {iv.coef} is out of range; steer with |c| ≤ {C_MAX:g} standard deviations.")
    if not math.isfinite(iv.value):
        raise InputError("the patched neuron value must be a finite number.")
    neuron_kind = iv.kind in NEURON_KINDS
    if neuron_kind != direction.is_neuron_set:
        raise InputError(f"{iv.kind!r} needs {'a neuron set' if neuron_kind else 'a direction'}, but this is "
                         f"{'a neuron set' if direction.is_neuron_set else 'a direction'}; "
                         f"use {'neuron_zero/neuron_mean/neuron_value' if direction.is_neuron_set else 'steer/ablate/mean_ablate'}.")
    if iv.kind == "steer" and iv.coef != 0 and not direction.proj_std:
        raise InputError("this direction has no activation statistics, so c has no unit; make it from a cache entry "
                         "(or attach the entry's statistics) before steering.")
    if iv.kind == "mean_ablate" and (direction.proj_mean is None or direction.mean_activation is None):
        raise InputError("mean-ablation needs the dataset mean along d̂; make the direction from a cache entry.")
    if iv.kind == "neuron_mean" and len(direction.neuron_means) != len(direction.neurons):
        raise InputError("mean-patching needs each neuron's dataset mean; make the neuron set from a cache entry.")


def is_noop(direction: Direction, iv: Intervention) -> bool:
    """True when the intervention cannot change anything (c = 0, an empty neuron set)."""
    return (iv.kind == "steer" and iv.coef == 0) or (direction.is_neuron_set and not direction.neurons)


def _token_matches(model: LoadedModel, ids: Sequence[int], tokens: Sequence[str]) -> np.ndarray:
    want = set(tokens)
    marker = getattr(model.tokenizer, "space_marker", "") or ""
    if marker and marker != " ":
        want |= {marker + t[1:] for t in tokens if t.startswith(" ")}
    text, raw = model.to_str_tokens(ids), model.tokenizer.token_strings(ids)
    return np.array([t in want or r in want for t, r in zip(text, raw)], dtype=bool)


def position_mask(model: LoadedModel, ids: Sequence[int], positions: str) -> np.ndarray:
    """[pos] bool: where the intervention applies for the token ids ``ids`` (BOS first when the model has one).

    Raises:
        InputError: an unknown rule, a bad index, or a rule that selects no position.
    """
    n = len(ids)
    rule = (positions or "all").strip()
    has_bos = n > 0 and model.tokenizer.bos_id is not None and int(ids[0]) == int(model.tokenizer.bos_id)
    mask = np.zeros(n, bool)
    if rule == "all":
        mask[1 if has_bos else 0:] = True
    elif rule == "last" or rule.startswith("last:"):
        try:
            k = 1 if rule == "last" else int(rule[5:])
        except ValueError:
            raise InputError(f"position rule {rule!r}: write last:N with a whole number N.") from None
        if k < 1:
            raise InputError(f"position rule {rule!r}: N must be at least 1.")
        mask[max(1 if has_bos else 0, n - k):] = True
    elif rule.startswith("match:"):
        toks = [t for t in rule[6:].split(",") if t != ""]
        if not toks:
            raise InputError("give the tokens to match, e.g. match: Paris, France (a leading space is kept).")
        mask = _token_matches(model, ids, toks)
    elif rule.startswith("idx:"):
        try:
            idx = [int(t) for t in rule[4:].split(",") if t.strip()]
        except ValueError:
            raise InputError(f"position rule {rule!r}: write idx:I,J with whole numbers.") from None
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise InputError(f"position {bad[0]} is out of range for a prompt of {n} tokens.")
        mask[idx] = True
    else:
        raise InputError(f"unknown position rule {rule!r}; use all, last, last:N, match:TOK,TOK or idx:I,J.")
    if not mask.any():
        raise InputError(f"the position rule {rule!r} matches no token of this prompt "
                         f"({' · '.join(repr(t) for t in model.to_str_tokens(list(ids))[:12])}); pick tokens that occur in it.")
    return mask


# ---------------------------------------------------------------------------------------------
# Hooks: one function for a batch whose rows may carry different directions / neuron sets
# ---------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """Per-row parameters of one hooked forward pass (tensors on the model's device)."""

    kind: str
    mask: torch.Tensor            # [batch, pos] bool
    dirs: torch.Tensor | None = None     # [batch, width] unit vectors
    amount: torch.Tensor | None = None   # [batch] steer size c·σ, or the mean projection μ
    idx: torch.Tensor | None = None      # [batch, m] neuron indices
    vals: torch.Tensor | None = None     # [batch, m] values to write


def _apply(x: torch.Tensor, b: _Batch) -> torch.Tensor:
    P = x.shape[1]
    m = b.mask[:, :P].to(x.dtype)[..., None]  # [batch, pos, 1]
    if b.kind == "steer":
        return x + m * (b.amount[:, None, None] * b.dirs[:, None, :]).to(x.dtype)
    if b.kind in ("ablate", "mean_ablate"):
        u = b.dirs.to(x.dtype)[:, None, :]
        proj = (x * u).sum(-1, keepdim=True)
        if b.kind == "mean_ablate":
            proj = proj - b.amount.to(x.dtype)[:, None, None]
        return x - m * proj * u
    idx = b.idx[:, None, :].expand(-1, P, -1)
    old = x.gather(-1, idx)
    new = torch.where(m.bool(), b.vals.to(x.dtype)[:, None, :].expand_as(old), old)
    return x.scatter(-1, idx, new)


def _hook_fn(batch: _Batch) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def fn(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
        return _apply(x, batch)

    return fn


def _forward(model: LoadedModel, tokens: torch.Tensor, hook: str | None, batch: _Batch | None) -> torch.Tensor:
    """Locked forward pass with an optional intervention. [batch, pos] → [batch, pos, d_vocab] float32 (CPU)."""
    bridge = model.bridge
    with model.lock, torch.inference_mode():
        if batch is None:
            out = bridge(tokens.to(model.device))
        else:
            with bridge.hooks(fwd_hooks=[(hook, _hook_fn(batch))]):
                out = bridge(tokens.to(model.device))
        return out.to("cpu", torch.float32)


def random_directions(width: int, k: int, seed: int = 0) -> np.ndarray:
    """[k, width] float32 random unit vectors (seeded standard normal, normalized).

    Raises:
        InputError: k outside 1…:data:`K_MAX`.
    """
    check_k_controls(k)
    r = np.random.default_rng(seed).standard_normal((k, width))
    return (r / np.linalg.norm(r, axis=1, keepdims=True)).astype(np.float32)


def random_neuron_sets(width: int, size: int, k: int, seed: int = 0) -> np.ndarray:
    """[k, size] int64: k random neuron sets of ``size`` distinct neurons each (seeded)."""
    check_k_controls(k)
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(width, size=size, replace=False) for _ in range(k)]).astype(np.int64)


def check_k_controls(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= K_MAX:
        raise InputError(f"the number of random controls K must be between 1 and {K_MAX}; got {k}. "
                         "Controls are what make an effect mean something: use K ≥ 20 where it is cheap.")
    return int(k)


def _rows_batch(model: LoadedModel, direction: Direction, iv: Intervention, mask: np.ndarray, *, controls: int = 0,
                seed: int = 0, include_probe: bool = True) -> _Batch:
    """Rows: [the probe direction] + ``controls`` random ones (same mask on every row)."""
    dev = model.device
    n = int(include_probe) + controls
    width = direction.width
    m = torch.from_numpy(np.broadcast_to(mask, (n,) + mask.shape[-1:]).copy()).to(dev)
    if direction.is_neuron_set:
        idx = np.asarray(direction.neurons, np.int64)[None]
        sets = [idx] if include_probe else []
        if controls:
            sets.append(random_neuron_sets(width, len(direction.neurons), controls, seed))
        I = np.concatenate(sets)
        if iv.kind == "neuron_zero":
            V = np.zeros(I.shape, np.float32)
        elif iv.kind == "neuron_value":
            V = np.full(I.shape, iv.value, np.float32)
        else:  # neuron_mean: the mean activation of each (random) neuron
            if direction.mean_activation is not None:
                V = direction.mean_activation[I]
            else:
                V = np.broadcast_to(np.asarray(direction.neuron_means, np.float32), I.shape).copy()
                if controls:
                    raise InputError("mean-patching random neuron sets needs the dataset mean activation; make the "
                                     "neuron set from a cache entry.")
        return _Batch(iv.kind, m, idx=torch.from_numpy(I).to(dev), vals=torch.from_numpy(np.asarray(V, np.float32)).to(dev))
    units = [direction.unit[None]] if include_probe else []
    if controls:
        units.append(random_directions(width, controls, seed))
    U = np.concatenate(units)
    if iv.kind == "steer":
        amount = np.full(n, iv.coef * (direction.proj_std or 0.0), np.float32)
    elif iv.kind == "mean_ablate":
        amount = (U @ direction.mean_activation).astype(np.float32)
        if include_probe:
            amount[0] = direction.proj_mean  # equal to m̄·d̂ over the same rows
    else:
        amount = np.zeros(n, np.float32)
    return _Batch(iv.kind, m, dirs=torch.from_numpy(U).to(dev), amount=torch.from_numpy(amount).to(dev))


def run_intervened(model: LoadedModel, tokens: torch.Tensor, direction: Direction, iv: Intervention,
                   mask: np.ndarray | None = None) -> torch.Tensor:
    """Logits of ``tokens`` [batch, pos] with the intervention at every row (``mask`` [pos] or [batch, pos];
    default: the position rule applied to row 0). A no-op intervention runs the bare forward pass.

    Returns:
        [batch, pos, d_vocab] float32 on the CPU.
    """
    check_direction(model, direction)
    check_intervention(direction, iv)
    if is_noop(direction, iv):
        return _forward(model, tokens, None, None)
    if mask is None:
        mask = position_mask(model, tokens[0].tolist(), iv.positions)
    b = _rows_batch(model, direction, iv, np.asarray(mask, bool)[-1] if np.ndim(mask) == 2 else np.asarray(mask, bool))
    if np.ndim(mask) == 2:
        b.mask = torch.from_numpy(np.asarray(mask, bool)).to(model.device)
    b = _expand_rows(b, tokens.shape[0])
    return _forward(model, tokens, direction.hook, b)


def _expand_rows(b: _Batch, n: int) -> _Batch:
    """Repeat a one-row batch over ``n`` rows (mask rows given per row are kept)."""
    rep = lambda t: None if t is None else (t.expand(n, *t.shape[1:]) if t.shape[0] == 1 else t)  # noqa: E731
    return _Batch(b.kind, rep(b.mask), rep(b.dirs), rep(b.amount), rep(b.idx), rep(b.vals))


# ---------------------------------------------------------------------------------------------
# Controls
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlComparison:
    """A probe effect against the same intervention along K random directions.

    Attributes:
        metric: what was measured (e.g. "Δ logit diff", "KL").
        value: the probe direction's effect.
        controls: [K] the random directions' effects.
        seed: the seed that drew the controls.
        percentile: share of controls below the value (ties count half), in percent.
        z: (value − mean) / std (ddof = 1; NaN when the controls do not vary).
        inside_band: min(controls) ≤ value ≤ max(controls).
    """

    metric: str
    value: float
    controls: np.ndarray
    seed: int
    percentile: float
    z: float
    inside_band: bool

    def summary(self) -> str:
        where = "inside the random band (no more than a random direction of the same size does)" if self.inside_band \
            else "outside the random band"
        return (f"{self.metric}: {self.value:+.4g} vs random {self.controls.mean():+.4g} ± {self.controls.std(ddof=1) if self.controls.size > 1 else 0:.3g} "
                f"(K = {self.controls.size}, seed {self.seed}); percentile {self.percentile:.0f}, z = {self.z:+.2f} — {where}.")

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "controls": self.controls.tolist(), "seed": self.seed,
                "percentile": self.percentile, "z": self.z, "inside_band": self.inside_band}


def compare_with_controls(value: float, controls: np.ndarray, *, metric: str = "effect", seed: int = 0) -> ControlComparison:
    """Percentile, z-score and band test of ``value`` among ``controls`` ([K], K ≥ 1)."""
    c = np.asarray(controls, np.float64).reshape(-1)
    if c.size == 0:
        raise InputError("no control effects to compare with; use K ≥ 1 random controls.")
    v = float(value)
    pct = 100.0 * (np.sum(c < v) + 0.5 * np.sum(c == v)) / c.size
    sd = float(c.std(ddof=1)) if c.size > 1 else 0.0
    z = (v - float(c.mean())) / sd if sd > 0 else math.nan
    return ControlComparison(metric, v, c, int(seed), float(pct), float(z), bool(c.min() <= v <= c.max()))


# ---------------------------------------------------------------------------------------------
# Effects on one prompt
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptEffect:
    """Before vs after one intervention on one prompt, with its random controls.

    Attributes:
        prompt, tokens: the prompt and its tokens (BOS first); ``mask`` [pos] where it applied.
        intervention: what was done (its label in ``intervention_label``); direction: its description.
        top_before / top_after: top-k rows (token, id, logit, prob) at the last position.
        answers: (a, b) or None; logit_diff_before/after and prob_diff_before/after (P(a) − P(b)).
        kl: KL(before ‖ after) of the next-token distribution at the last position (nats).
        controls: ``ControlComparison`` per metric ("Δ logit diff" when answers are given, "KL").
        control_logit_diff: [K] logit difference after each control (None without answers).
        lens_before / lens_after: logit lens of the prompt (None unless asked for).
        continuation_before / continuation_after: greedy continuations (text).
    """

    prompt: str
    tokens: list[str]
    mask: np.ndarray
    intervention: Intervention
    intervention_label: str
    direction: str
    top_before: list[dict[str, Any]]
    top_after: list[dict[str, Any]]
    answers: tuple[str, str] | None
    logit_diff_before: float | None
    logit_diff_after: float | None
    prob_diff_before: float | None
    prob_diff_after: float | None
    kl: float
    controls: dict[str, ControlComparison]
    control_logit_diff: np.ndarray | None = None
    lens_before: lens.LogitLensResult | None = None
    lens_after: lens.LogitLensResult | None = None
    continuation_before: str = ""
    continuation_after: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "tokens": self.tokens, "positions": np.flatnonzero(self.mask).tolist(),
            "intervention": self.intervention_label, "direction": self.direction,
            "top_before": self.top_before, "top_after": self.top_after,
            "answers": None if self.answers is None else list(self.answers),
            "logit_diff": {"before": self.logit_diff_before, "after": self.logit_diff_after},
            "prob_diff": {"before": self.prob_diff_before, "after": self.prob_diff_after},
            "kl": self.kl, "controls": {k: v.to_json() for k, v in self.controls.items()},
            "continuation": {"before": self.continuation_before, "after": self.continuation_after},
        }


def _top_rows(model: LoadedModel, logits: torch.Tensor, k: int) -> list[dict[str, Any]]:
    lp = logits.log_softmax(-1)
    t = torch.topk(logits, k)
    toks = model.to_str_tokens(t.indices.tolist())
    return [{"rank": i, "token": s, "token_id": int(j), "logit": float(v), "prob": float(lp[j].exp())}
            for i, (s, j, v) in enumerate(zip(toks, t.indices.tolist(), t.values.tolist()))]


def _kl(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """KL(before ‖ after) along the last axis (nats); ``after`` may carry extra leading rows."""
    lp, lq = before.log_softmax(-1), after.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def intervene_prompt(
    model: LoadedModel,
    prompt: str,
    direction: Direction,
    iv: Intervention,
    *,
    answers: tuple[str, str] | None = None,
    k: int = 10,
    k_controls: int = 20,
    seed: int = 0,
    with_lens: bool = False,
    n_generate: int = 0,
    max_tokens: int = 128,
) -> PromptEffect:
    """Run ``prompt`` before and after the intervention, and along ``k_controls`` random directions in one batch.

    Args:
        answers: an answer pair (a, b) of one token each: logit difference and P(a) − P(b) before/after.
        k: top-k rows to list. k_controls: K random controls (one forward pass of K copies).
        with_lens: also compute the logit lens before and after (the page's heatmaps).
        n_generate: tokens of greedy continuation before and after (0 = none).

    Raises:
        InputError: model/width mismatch, c out of range, K out of range, positions matching nothing, …
    """
    check_direction(model, direction)
    check_intervention(direction, iv)
    k = lens._check_k(model, k)
    K = check_k_controls(k_controls)
    ids = lens.encode_prompt(model, prompt, max_tokens=max_tokens)
    mask = position_mask(model, ids, iv.positions)
    pair = None
    if answers is not None:
        pair = (lens.single_token_id(model, answers[0], what="first answer"), lens.single_token_id(model, answers[1], what="second answer"))
    toks = torch.tensor([ids])
    before = _forward(model, toks, None, None)[0, -1]
    noop = is_noop(direction, iv)
    if noop:
        after = before
        ctrl = before[None].expand(K, -1)
    else:
        b = _rows_batch(model, direction, iv, mask, controls=K, seed=seed)
        out = _forward(model, toks.expand(K + 1, -1), direction.hook, b)[:, -1]
        after, ctrl = out[0], out[1:]
    kl = float(_kl(before, after))
    controls = {"KL": compare_with_controls(kl, as_numpy(_kl(before[None], ctrl)), metric="KL(before ‖ after)", seed=seed)}
    ld = dict.fromkeys(("ld_b", "ld_a", "pd_b", "pd_a"))
    cld = None
    if pair is not None:
        def diff(lg: torch.Tensor) -> torch.Tensor:
            return lg[..., pair[0]] - lg[..., pair[1]]

        def pdiff(lg: torch.Tensor) -> torch.Tensor:
            p = lg.softmax(-1)
            return p[..., pair[0]] - p[..., pair[1]]

        ld.update(ld_b=float(diff(before)), ld_a=float(diff(after)), pd_b=float(pdiff(before)), pd_a=float(pdiff(after)))
        cld = as_numpy(diff(ctrl))
        controls["Δ logit diff"] = compare_with_controls(ld["ld_a"] - ld["ld_b"], cld - ld["ld_b"],
                                                         metric=f"Δ logit diff {answers[0]!r} − {answers[1]!r}", seed=seed)
    lens_b = lens_a = None
    if with_lens:
        lens_b = lens.logit_lens(model, prompt, k=min(k, 5), max_tokens=max_tokens)
        lens_a = lens_b if noop else _lens_intervened(model, prompt, direction, iv, mask, k=min(k, 5), max_tokens=max_tokens)
    cont_b = cont_a = ""
    if n_generate > 0:
        cont_b = greedy_continuation(model, ids, None, None, n_generate)
        cont_a = cont_b if noop else greedy_continuation(model, ids, direction, iv, n_generate)
    return PromptEffect(
        prompt=prompt, tokens=model.to_str_tokens(ids), mask=mask, intervention=iv, intervention_label=iv.label(),
        direction=f"{direction.method} @ {direction.hook}: {direction.description}",
        top_before=_top_rows(model, before, k), top_after=_top_rows(model, after, k), answers=answers,
        logit_diff_before=ld["ld_b"], logit_diff_after=ld["ld_a"], prob_diff_before=ld["pd_b"], prob_diff_after=ld["pd_a"],
        kl=kl, controls=controls, control_logit_diff=cld, lens_before=lens_b, lens_after=lens_a,
        continuation_before=cont_b, continuation_after=cont_a,
    )


def _lens_intervened(model: LoadedModel, prompt: str, direction: Direction, iv: Intervention, mask: np.ndarray,
                     **kw: Any) -> lens.LogitLensResult:
    """:func:`lens.logit_lens` with the intervention's hook attached (the lock is re-entrant)."""
    b = _rows_batch(model, direction, iv, mask)
    with model.lock, model.bridge.hooks(fwd_hooks=[(direction.hook, _hook_fn(b))]):
        return lens.logit_lens(model, prompt, **kw)


def lens_target_prob(model: LoadedModel, ids: Sequence[int], targets: Sequence[int], direction: Direction | None = None,
                     iv: Intervention | None = None, mask: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """Logit-lens probability of ``targets[p]`` at every layer and position p, optionally under an intervention.

    Same reading as :func:`lens.logit_lens` (``accumulated_resid(apply_ln=True)`` then the unembedding).

    Returns:
        (row labels, [layer, pos] float32 probabilities).
    """
    n = model.n_layers
    names = {f"blocks.{i}.hook_resid_pre" for i in range(n)} | {f"blocks.{n - 1}.hook_resid_post"}
    bridge = model.bridge
    tgt = torch.tensor(list(targets), dtype=torch.int64)
    with model.lock, torch.inference_mode():
        ctx = _null()
        if direction is not None and iv is not None and not is_noop(direction, iv):
            ctx = bridge.hooks(fwd_hooks=[(direction.hook, _hook_fn(_rows_batch(model, direction, iv, mask)))])
        with ctx:
            _, cache = bridge.run_with_cache(torch.tensor([list(ids)]).to(model.device), names_filter=lambda nm: nm in names)
            stack, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
            # one layer at a time: [layer, pos, d_vocab] at once is ~0.8 GB for 128 tokens of a 49k vocabulary
            probs = []
            for resid in stack[:, 0]:
                lp = bridge.unembed(resid[None])[0].to("cpu", torch.float32).log_softmax(-1)  # [pos, d_vocab]
                probs.append(lp.gather(-1, tgt[:, None])[:, 0].exp())
    return list(labels), torch.stack(probs).numpy()


@dataclass(frozen=True)
class LensDiff:
    """Logit lens after an intervention minus before, for the unintervened model's final top-1 token at each position.

    Attributes:
        labels: [layer] row labels; tokens: [pos] the prompt's tokens; targets: [pos] the tracked tokens.
        before, after, diff: [layer, pos] probabilities of the tracked token and after − before.
    """

    labels: list[str]
    tokens: list[str]
    targets: list[str]
    before: np.ndarray
    after: np.ndarray

    @property
    def diff(self) -> np.ndarray:
        return self.after - self.before


def lens_difference(model: LoadedModel, prompt: str, direction: Direction, iv: Intervention, *,
                    max_tokens: int = 128) -> LensDiff:
    """Per layer and position: how the lens's probability of the unintervened top-1 token moves.

    Raises:
        InputError: as :func:`intervene_prompt`.
    """
    check_direction(model, direction)
    check_intervention(direction, iv)
    ids = lens.encode_prompt(model, prompt, max_tokens=max_tokens)
    mask = position_mask(model, ids, iv.positions)
    final = _forward(model, torch.tensor([ids]), None, None)[0].argmax(-1).tolist()
    labels, before = lens_target_prob(model, ids, final)
    _, after = lens_target_prob(model, ids, final, direction, iv, mask)
    return LensDiff(labels, model.to_str_tokens(ids), model.to_str_tokens(final), before, after)


def greedy_continuation(model: LoadedModel, ids: Sequence[int], direction: Direction | None, iv: Intervention | None,
                        n_new: int) -> str:
    """The next ``n_new`` greedy tokens (text), with the intervention re-applied to the grown prompt at every step."""
    if not 0 <= n_new <= 64:
        raise InputError(f"generate between 0 and 64 tokens; got {n_new}.")
    seq = list(ids)
    for _ in range(n_new):
        if len(seq) >= model.n_ctx:
            break
        toks = torch.tensor([seq])
        if direction is None or iv is None:
            lg = _forward(model, toks, None, None)
        else:
            lg = run_intervened(model, toks, direction, iv, position_mask(model, seq, iv.positions))
        seq.append(int(lg[0, -1].argmax()))
    return "".join(model.to_str_tokens(seq[len(ids):]))


# ---------------------------------------------------------------------------------------------
# Steering sweeps (P(a) − P(b) as c moves, against the random band)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SteeringSweep:
    """P(a) − P(b) as c moves, for the probe direction and K random directions of the same norm.

    Attributes:
        coefs: [n_c] steering strengths (σ units), 0 included.
        prompts, classes: the prompts and a class per prompt (e.g. "true"/"false").
        answers: (a, b).
        probe: [n_c, n_prompts] P(a) − P(b) along the probe direction.
        controls: [K, n_c, n_prompts] the same along each random direction.
        seed: the controls' seed; hook, positions, direction: what was steered where.
        seconds: wall time.
    """

    coefs: np.ndarray
    prompts: tuple[str, ...]
    classes: tuple[str, ...]
    answers: tuple[str, str]
    probe: np.ndarray
    controls: np.ndarray
    seed: int
    hook: str
    positions: str
    direction: str
    seconds: float

    def class_mean(self, cls: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """([n_c] probe mean, [K, n_c] control means) over the prompts of class ``cls`` (all if None)."""
        sel = np.array([cls is None or c == cls for c in self.classes])
        return self.probe[:, sel].mean(1), self.controls[:, :, sel].mean(2)

    def comparison(self, c_index: int, cls: str | None = None) -> ControlComparison:
        """Change of the class mean from c = 0 at ``coefs[c_index]``, against the controls' changes."""
        p, ctl = self.class_mean(cls)
        z = int(np.flatnonzero(self.coefs == 0)[0])
        return compare_with_controls(p[c_index] - p[z], ctl[:, c_index] - ctl[:, z],
                                     metric=f"Δ P({self.answers[0]!r}) − P({self.answers[1]!r}) at c = {self.coefs[c_index]:+g}"
                                     + (f" ({cls})" if cls else ""), seed=self.seed)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for ci, c in enumerate(self.coefs):
            for pi, (p, cl) in enumerate(zip(self.prompts, self.classes)):
                out.append({"c": float(c), "prompt": p, "class": cl, "probe": float(self.probe[ci, pi]),
                            "random_mean": float(self.controls[:, ci, pi].mean()),
                            "random_min": float(self.controls[:, ci, pi].min()),
                            "random_max": float(self.controls[:, ci, pi].max())})
        return out


def steering_sweep(
    model: LoadedModel,
    prompts: Sequence[str],
    direction: Direction,
    *,
    answers: tuple[str, str],
    coefs: Sequence[float],
    positions: str = "last",
    classes: Sequence[str] | None = None,
    k_controls: int = 20,
    seed: int = 0,
    progress: Progress | None = None,
) -> SteeringSweep:
    """P(a) − P(b) after each prompt while steering by ``c · σ · d̂`` for every c, and along K random directions.

    One forward pass per prompt and nonzero c: a batch of 1 + K copies of the prompt (probe + controls).

    Raises:
        InputError: as :func:`intervene_prompt`; no prompts; c out of range.
    """
    check_direction(model, direction)
    K = check_k_controls(k_controls)
    cs = sorted({0.0, *(float(c) for c in coefs)})
    for c in cs:
        check_intervention(direction, Intervention("steer", positions, c))
    if not prompts:
        raise InputError("no prompts to steer; give at least one.")
    a, b = (lens.single_token_id(model, answers[0], what="first answer"), lens.single_token_id(model, answers[1], what="second answer"))
    t0 = time.perf_counter()
    probe = np.zeros((len(cs), len(prompts)), np.float32)
    ctrl = np.zeros((K, len(cs), len(prompts)), np.float32)
    steps, done = len(prompts) * len(cs), 0
    for pi, prompt in enumerate(prompts):
        ids = lens.encode_prompt(model, prompt)
        mask = position_mask(model, ids, positions)
        toks = torch.tensor([ids])
        for ci, c in enumerate(cs):
            if c == 0:
                p = _forward(model, toks, None, None)[0, -1].softmax(-1)
                probe[ci, pi] = ctrl[:, ci, pi] = float(p[a] - p[b])
            else:
                bt = _rows_batch(model, direction, Intervention("steer", positions, c), mask, controls=K, seed=seed)
                p = _forward(model, toks.expand(K + 1, -1), direction.hook, bt)[:, -1].softmax(-1)
                d = as_numpy(p[:, a] - p[:, b])
                probe[ci, pi], ctrl[:, ci, pi] = d[0], d[1:]
            done += 1
            if progress:
                progress(done / steps, f"steering prompt {pi + 1}/{len(prompts)}, c = {c:+g}")
    return SteeringSweep(np.asarray(cs), tuple(prompts), tuple(classes or [""] * len(prompts)), tuple(answers), probe, ctrl,
                         seed, direction.hook, positions, direction.description, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Neuron read-out
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuronReadout:
    """What each neuron writes: ``W_out[layer][n] @ W_U`` (the compatibility-mode unembedding,
    final norm folded), its top and bottom tokens, beside its probe coefficient.

    Attributes:
        layer, neurons: [m]; logits: [m, d_vocab] the read-out vectors.
        top_tokens / bottom_tokens: [m][k] token texts promoted / suppressed; top_values / bottom_values: [m, k].
        coefs: [m] probe coefficient of each neuron (NaN when unknown).
    """

    layer: int
    neurons: np.ndarray
    logits: np.ndarray
    top_tokens: list[list[str]]
    top_values: np.ndarray
    bottom_tokens: list[list[str]]
    bottom_values: np.ndarray
    coefs: np.ndarray

    def rows(self) -> list[dict[str, Any]]:
        return [{"neuron": int(n), "probe_coef": float(c), "promotes": " | ".join(map(repr, t)),
                 "suppresses": " | ".join(map(repr, b))}
                for n, c, t, b in zip(self.neurons, self.coefs, self.top_tokens, self.bottom_tokens)]


def neuron_readout(model: LoadedModel, layer: int, neurons: Sequence[int], *, k: int = 10,
                   coefs: Sequence[float] | None = None) -> NeuronReadout:
    """Tokens each MLP neuron's output weights promote and suppress through the unembedding.

    Raises:
        InputError: layer or neuron index out of range, no neurons, bad k.
    """
    if not 0 <= int(layer) < model.n_layers:
        raise InputError(f"layer {layer} is out of range (0…{model.n_layers - 1}).")
    idx = [int(n) for n in neurons]
    if not idx:
        raise InputError("pick at least one neuron to read out.")
    bad = [n for n in idx if not 0 <= n < model.d_mlp]
    if bad:
        raise InputError(f"neuron index {bad[0]} is out of range (0…{model.d_mlp - 1}).")
    k = lens._check_k(model, k)
    with model.lock, torch.inference_mode():
        W_out = model.bridge.W_out[int(layer)]  # [d_mlp, d_model]
        out = (W_out[idx].float() @ model.bridge.W_U.float()).cpu()  # [m, d_vocab]
    top = torch.topk(out, k, dim=-1)
    bot = torch.topk(-out, k, dim=-1)
    c = np.full(len(idx), np.nan) if coefs is None else np.asarray(coefs, np.float64)
    return NeuronReadout(int(layer), np.asarray(idx), out.numpy(),
                         [model.to_str_tokens(r) for r in top.indices.tolist()], top.values.numpy(),
                         [model.to_str_tokens(r) for r in bot.indices.tolist()], -bot.values.numpy(), c)


class _null:
    """A do-nothing context manager (no intervention)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def parse_number_list(text: str, *, what: str = "numbers", integer: bool = False) -> list[float] | list[int]:
    """``"3, 17, 40"`` → ``[3, 17, 40]`` (the page's and URL's form of neuron lists and coefficients).

    Raises:
        InputError: an item that is not a number (a whole number when ``integer``).
    """
    out: list = []
    for item in (t.strip() for t in (text or "").split(",")):
        if not item:
            continue
        try:
            out.append(int(item) if integer else float(item))
        except ValueError:
            raise InputError(f"{item!r} in the {what} is not a {'whole ' if integer else ''}number; "
                             "write them comma-separated, e.g. 3, 17, 40.") from None
    return out


def parse_answer_pair(text: str) -> tuple[str, ...] | None:
    """``" True | False"`` → ``(" True", " False")``: trailing spaces dropped (a leading space belongs to the
    token); None unless the text holds exactly two answers."""
    parts = (text or "").split("|")
    return tuple(t.rstrip() for t in parts) if len(parts) == 2 else None


def parse_readout(neurons: str, coefs: str) -> tuple[list[int], list[float] | None]:
    """The neuron read-out's two text boxes: neuron indices, and their probe coefficients (None when empty).

    Raises:
        InputError: an item that is not a number, or not one coefficient per neuron.
    """
    idx = parse_number_list(neurons, what="neuron list", integer=True)
    cf = parse_number_list(coefs, what="coefficients") if (coefs or "").strip() else None
    if cf is not None and len(cf) != len(idx):
        raise InputError(f"{len(idx)} neurons but {len(cf)} coefficients; give one per neuron or none.")
    return idx, cf
