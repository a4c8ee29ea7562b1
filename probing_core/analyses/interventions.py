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

import io
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from probing_core.analyses import lens
from probing_core.errors import HookError, InputError, ProbeError
from probing_core.models import LoadedModel, as_numpy
from probing_core.store.activations import CachedActivations

Progress = Callable[[float, str], None]

#: Largest |c| accepted, in standard deviations along the direction.
C_MAX = 50.0
#: Most random controls in one comparison.
K_MAX = 256
DIRECTION_FORMAT = 1
METHODS = ("mass_mean", "ridge", "logistic", "neurons", "random", "weights")
KINDS = ("steer", "ablate", "mean_ablate", "neuron_zero", "neuron_mean", "neuron_value")
NEURON_KINDS = ("neuron_zero", "neuron_mean", "neuron_value")


# ---------------------------------------------------------------------------------------------
# Directions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Direction:
    """A direction (or a neuron set) at one hook of one model.

    Attributes:
        vector: [width] float32 as made (not normalized); for a neuron set, the probe coefficients
            at the neurons' coordinates and 0 elsewhere (ones when no coefficients were given).
        model_key: :attr:`LoadedModel.key` of the model whose activations made it.
        hook: the hook name (e.g. ``blocks.5.hook_resid_post``).
        width: the hook's width (d_model, or d_mlp for ``mlp.hook_post``).
        method: mass_mean | ridge | logistic | neurons | random | weights.
        description: one line saying how it was made (label, rows, α/C).
        proj_mean, proj_std: mean and std of ``x·d̂`` over the rows it was made from (None when unknown).
        mean_activation: [width] dataset mean activation (for mean-ablation and its controls), or None.
        neurons: neuron indices (neuron sets only).
        neuron_means: dataset mean of each neuron (neuron sets made from data; for mean-patching).
    """

    vector: np.ndarray
    model_key: str
    hook: str
    width: int
    method: str
    description: str = ""
    proj_mean: float | None = None
    proj_std: float | None = None
    mean_activation: np.ndarray | None = None
    neurons: tuple[int, ...] = ()
    neuron_means: tuple[float, ...] = ()

    @property
    def is_neuron_set(self) -> bool:
        return self.method == "neurons"

    @property
    def norm(self) -> float:
        return float(np.linalg.norm(self.vector.astype(np.float64)))

    @property
    def unit(self) -> np.ndarray:
        """[width] float32 unit vector d̂."""
        return (self.vector.astype(np.float64) / self.norm).astype(np.float32)

    def to_json(self) -> dict[str, Any]:
        """The JSON sidecar (everything but the vector)."""
        return {
            "format": DIRECTION_FORMAT, "model_key": self.model_key, "hook": self.hook, "width": self.width,
            "method": self.method, "description": self.description, "norm": self.norm,
            "proj_mean": self.proj_mean, "proj_std": self.proj_std,
            "mean_activation": None if self.mean_activation is None else [float(f"{v:.7g}") for v in self.mean_activation],
            "neurons": list(self.neurons), "neuron_means": list(self.neuron_means),
        }


def _check_vector(v: Any, what: str = "direction") -> np.ndarray:
    v = np.asarray(v)
    if v.dtype == object or not np.issubdtype(v.dtype, np.number):
        raise InputError(f"the {what} must be a numeric array; got dtype {v.dtype}.")
    v = np.squeeze(v)
    if v.ndim != 1:
        raise InputError(f"the {what} must be one vector (shape (width,)); got shape {np.shape(v)}.")
    v = v.astype(np.float32)
    if not np.isfinite(v).all():
        raise InputError(f"the {what} contains {int((~np.isfinite(v)).sum())} NaN/inf values; refit the probe or "
                         "export the direction again.")
    if not np.any(v):
        raise InputError(f"the {what} is the zero vector, which has no direction; pick a probe whose weights are "
                         "not all zero (a weaker penalty, or the mass-mean direction).")
    return v


def projection_stats(X: np.ndarray, vector: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(mean, std) of ``X @ d̂`` and the mean activation of ``X`` ([n, width] → floats, [width])."""
    u = vector.astype(np.float64) / np.linalg.norm(vector.astype(np.float64))
    X = np.asarray(X, dtype=np.float32)
    proj = X @ u.astype(np.float32)
    return float(proj.mean()), float(proj.std()), X.mean(0, dtype=np.float64).astype(np.float32)


def _binary(y: np.ndarray, positive: Any = None) -> np.ndarray:
    y = np.asarray(y)
    if positive is not None:
        return (y == positive).astype(np.int64)
    vals = np.unique(y)
    if vals.size != 2:
        raise ProbeError(f"a mass-mean or one-vs-rest direction needs a binary label (two values); this one has "
                         f"{vals.size} ({vals[:5].tolist()}…). Pick the class to contrast with the rest.")
    return (y == vals[1]).astype(np.int64)


def _with_stats(vector: np.ndarray, X: np.ndarray | None, **kw: Any) -> Direction:
    if X is not None:
        m, s, mean_act = projection_stats(X, vector)
        kw.update(proj_mean=m, proj_std=s, mean_activation=mean_act)
    return Direction(vector=vector, **kw)


def mass_mean_direction(X: np.ndarray, y: np.ndarray, *, model_key: str, hook: str, positive: Any = None,
                        description: str = "") -> Direction:
    """The difference of class means ``mean(X[y=1]) − mean(X[y=0])`` (Marks & Tegmark's mass-mean probe).

    Args:
        X: [n, width] activations at ``hook``.
        y: [n] binary labels (or any labels with ``positive`` naming the class contrasted with the rest).

    Raises:
        ProbeError: a label that is not binary, or a class with no rows.
    """
    X = np.asarray(X, dtype=np.float32)
    yb = _binary(y, positive)
    if yb.sum() == 0 or yb.sum() == yb.size:
        raise ProbeError("the label has only one class among these rows; a mass-mean direction needs both.")
    v = X[yb == 1].mean(0, dtype=np.float64) - X[yb == 0].mean(0, dtype=np.float64)
    v = _check_vector(v, "mass-mean direction")
    return _with_stats(v, X, model_key=model_key, hook=hook, width=X.shape[1], method="mass_mean",
                       description=description or f"mass-mean: {int(yb.sum())} positive vs {int((1 - yb).sum())} rows")


def ridge_direction(X: np.ndarray, y: np.ndarray, *, model_key: str, hook: str, alpha: float = 1.0,
                    description: str = "") -> Direction:
    """The weight vector of a ridge regression of ``y`` on ``X`` (centred, closed form in float64).

    Raises:
        ProbeError: α ≤ 0 or a constant label.
    """
    if not alpha > 0:
        raise ProbeError(f"ridge α must be positive; got {alpha}.")
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if np.ptp(y) == 0:
        raise ProbeError("the label is constant on these rows; a ridge direction needs it to vary.")
    Xc, yc = X - X.mean(0), y - y.mean()
    w = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ yc)
    return _with_stats(_check_vector(w, "ridge direction"), X.astype(np.float32), model_key=model_key, hook=hook,
                       width=X.shape[1], method="ridge", description=description or f"ridge weights, α = {alpha:g}")


def logistic_direction(X: np.ndarray, y: np.ndarray, *, model_key: str, hook: str, positive: Any = None,
                       C: float = 1.0, penalty: str = "l2", description: str = "") -> Direction:
    """Weights of a logistic probe (one class vs the rest), mapped back to raw activation units.

    The probe is fit by scikit-learn on standardized features (``lbfgs`` for L2, ``liblinear`` for
    L1); the returned vector is ``w / σ_feature`` so that it acts on raw activations.
    """
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(X, dtype=np.float32)
    yb = _binary(y, positive)
    if yb.sum() in (0, yb.size):
        raise ProbeError("the label has only one class among these rows; a logistic direction needs both.")
    sd = X.std(0)
    sd[sd == 0] = 1.0
    Z = (X - X.mean(0)) / sd
    clf = LogisticRegression(C=C, l1_ratio=1.0 if penalty == "l1" else 0.0, solver="liblinear" if penalty == "l1" else "lbfgs",
                             max_iter=2000)
    clf.fit(Z, yb)
    w = clf.coef_[0] / sd
    return _with_stats(_check_vector(w, f"{penalty} logistic direction"), X, model_key=model_key, hook=hook,
                       width=X.shape[1], method="logistic",
                       description=description or f"{penalty.upper()} logistic weights, C = {C:g}")


def weights_direction(vector: np.ndarray, *, model_key: str, hook: str, method: str = "weights",
                      X: np.ndarray | None = None, description: str = "") -> Direction:
    """Wrap an existing weight vector (e.g. a probe downloaded from another page); stats from ``X`` if given."""
    v = _check_vector(vector)
    return _with_stats(v, X, model_key=model_key, hook=hook, width=v.size, method=method, description=description)


def neuron_direction(neurons: Sequence[int], *, model_key: str, hook: str, width: int, coefs: Sequence[float] | None = None,
                     X: np.ndarray | None = None, description: str = "") -> Direction:
    """A set of MLP neurons (e.g. an L1 probe's survivors) to zero-, mean- or value-patch.

    Raises:
        InputError: an index out of range, repeated indices, or coefficients of another length.
    """
    idx = [int(n) for n in neurons]
    bad = [n for n in idx if not 0 <= n < width]
    if bad:
        raise InputError(f"neuron index {bad[0]} is out of range for hook {hook!r} (0…{width - 1}).")
    if len(set(idx)) != len(idx):
        raise InputError("a neuron is listed twice; give each neuron once.")
    vec = np.zeros(width, np.float32)
    if coefs is not None:
        if len(coefs) != len(idx):
            raise InputError(f"{len(idx)} neurons but {len(coefs)} coefficients.")
        vec[idx] = np.asarray(coefs, np.float32)
    if idx and not np.any(vec[idx]):
        vec[idx] = 1.0
    means: tuple[float, ...] = ()
    if X is not None and idx:
        means = tuple(float(v) for v in np.asarray(X, np.float32)[:, idx].mean(0))
    return Direction(vector=vec, model_key=model_key, hook=hook, width=width, method="neurons",
                     description=description or f"{len(idx)} neurons", neurons=tuple(idx), neuron_means=means)


def check_direction(model: LoadedModel, direction: Direction) -> None:
    """Refuse a direction made on another model or for a hook of another width.

    Raises:
        InputError: model key or width mismatch, NaN/zero vector. HookError: unknown hook.
    """
    if direction.model_key != model.key:
        raise InputError(f"this direction was made on another model (key {direction.model_key}); the loaded model's key "
                         f"is {model.key}. Make the direction again with this model.")
    model.check_hooks([direction.hook])
    w = model.hook_width(direction.hook)
    if direction.width != w or direction.vector.shape != (w,):
        raise InputError(f"the direction has width {direction.vector.shape[0]} but hook {direction.hook!r} has width {w}; "
                         "use a direction made at a hook of the same kind.")
    if not direction.is_neuron_set:
        _check_vector(direction.vector)


def with_stats_from(direction: Direction, X: np.ndarray) -> Direction:
    """The same direction with σ, μ and the mean activation measured on ``X`` ([n, width])."""
    m, s, mean_act = projection_stats(X, direction.vector)
    means = direction.neuron_means
    if direction.neurons:
        means = tuple(float(v) for v in np.asarray(X, np.float32)[:, list(direction.neurons)].mean(0))
    return replace(direction, proj_mean=m, proj_std=s, mean_activation=mean_act, neuron_means=means)


# ---- files: .npy (allow_pickle=False) + JSON; nothing loaded ever executes code ------------------


def direction_to_bytes(direction: Direction) -> tuple[bytes, bytes]:
    """(``.npy`` bytes of the vector, JSON bytes of the rest)."""
    buf = io.BytesIO()
    np.save(buf, direction.vector.astype(np.float32), allow_pickle=False)
    return buf.getvalue(), json.dumps(direction.to_json(), indent=1).encode()


def direction_from_bytes(npy: bytes, meta: bytes | str) -> Direction:
    """Read a direction written by :func:`direction_to_bytes` (never unpickles).

    Raises:
        InputError: not an ``.npy`` of numbers, NaN/inf, zero vector, bad JSON, widths that disagree.
    """
    try:
        arr = np.load(io.BytesIO(npy), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"the direction file is not a plain numeric .npy array ({e}); export it again.") from e
    try:
        info = json.loads(meta)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"the direction's JSON file cannot be read ({e}); export it again.") from e
    if not isinstance(info, dict) or not {"model_key", "hook", "method"} <= set(info):
        raise InputError("the direction's JSON needs model_key, hook and method (as written by the export).")
    neurons = tuple(int(n) for n in info.get("neurons") or ())
    vec = np.asarray(arr, np.float32).reshape(-1) if info.get("method") == "neurons" else _check_vector(arr)
    if not np.isfinite(vec).all():
        raise InputError("the direction file contains NaN/inf values; export it again.")
    width = int(info.get("width", vec.size))
    if width != vec.size:
        raise InputError(f"the JSON says width {width} but the .npy holds {vec.size} numbers; they belong to different directions.")
    mean_act = info.get("mean_activation")
    if mean_act is not None:
        mean_act = np.asarray(mean_act, np.float32)
        if mean_act.shape != (width,) or not np.isfinite(mean_act).all():
            raise InputError("the JSON's mean_activation does not match the direction's width; export it again.")
    opt = lambda k: None if info.get(k) is None else float(info[k])  # noqa: E731
    return Direction(vector=vec, model_key=str(info["model_key"]), hook=str(info["hook"]), width=width,
                     method=str(info["method"]), description=str(info.get("description", "")),
                     proj_mean=opt("proj_mean"), proj_std=opt("proj_std"), mean_activation=mean_act,
                     neurons=neurons, neuron_means=tuple(float(v) for v in info.get("neuron_means") or ()))


def save_direction(direction: Direction, path: Path | str) -> list[Path]:
    """Write ``<stem>.npy`` and ``<stem>.json``; returns both paths."""
    stem = Path(path)
    stem = stem.with_suffix("") if stem.suffix in (".npy", ".json") else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    npy, meta = direction_to_bytes(direction)
    out = [stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")]
    out[0].write_bytes(npy)
    out[1].write_bytes(meta)
    return out


def load_direction(path: Path | str) -> Direction:
    """Read ``<stem>.npy`` + ``<stem>.json`` (``path`` may name either file or the stem).

    Raises:
        InputError: a file is missing or unreadable (see :func:`direction_from_bytes`).
    """
    stem = Path(path)
    stem = stem.with_suffix("") if stem.suffix in (".npy", ".json") else stem
    npy, meta = stem.with_name(stem.name + ".npy"), stem.with_name(stem.name + ".json")
    for p in (npy, meta):
        if not p.is_file():
            raise InputError(f"{p} does not exist; a direction is a .npy file with a .json file of the same name beside it.")
    return direction_from_bytes(npy.read_bytes(), meta.read_bytes())


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
            lg = bridge.unembed(stack[:, 0]).to("cpu", torch.float32)  # [layer, pos, d_vocab]
    lp = lg.log_softmax(-1)
    return list(labels), lp.gather(-1, tgt[None, :, None].expand(lp.shape[0], -1, 1))[..., 0].exp().numpy()


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


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


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
