"""Directions at a hook: what a probe found, as a vector (or a set of MLP neurons) to intervene along.

A :class:`Direction` is a ridge or logistic weight vector, the difference of class means
("mass-mean", often the more causal one — offered first), or a set of MLP neurons, with the
statistics that give a steering strength its unit (the std of the activations' projection on it)
and that mean-ablation needs. It is saved as a plain ``.npy`` (read with ``allow_pickle=False``)
plus a small JSON file (model key, hook, width, how it was made): loading never executes code.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from probing_core.errors import InputError, ProbeError
from probing_core.models import LoadedModel

if TYPE_CHECKING:
    from probing_core.data.labels import LabelSpec
    from probing_core.store.activations import CachedActivations

DIRECTION_FORMAT = 1
METHODS = ("mass_mean", "ridge", "logistic", "neurons", "random", "weights")


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
    mean_act = None
    if X is not None:
        mean_act = np.asarray(X, np.float32).mean(0, dtype=np.float64).astype(np.float32)  # also for random neuron sets
        means = tuple(float(mean_act[i]) for i in idx)
    return Direction(vector=vec, model_key=model_key, hook=hook, width=width, method="neurons",
                     description=description or f"{len(idx)} neurons", neurons=tuple(idx), neuron_means=means,
                     mean_activation=mean_act)


def methods_at(hook: str) -> list[str]:
    """The ways to make a direction at ``hook``, mass-mean first (often the more causal one); a neuron set only
    at MLP neurons."""
    return ["mass_mean", "logistic", "ridge"] + (["neurons"] if "mlp" in hook else [])


def direction_from_data(method: str, X: np.ndarray, y: np.ndarray, *, model_key: str, hook: str,
                        neurons: Sequence[int] = (), about: str = "") -> Direction:
    """A direction made by ``method`` from activations ``X`` [n, width] at ``hook`` and labels ``y`` [n].

    mass_mean and logistic contrast the label's largest value with every other row; ridge regresses the label;
    neurons is the neuron set ``neurons`` with its dataset means from ``X``. ``about`` (what the rows and label
    are) makes the description "<method> of <about>" (not for neuron sets).

    Raises:
        InputError: an unknown method; see also the maker of each method.
    """
    if method == "neurons":
        return neuron_direction(neurons, model_key=model_key, hook=hook, width=X.shape[1], X=X)
    make = {"mass_mean": mass_mean_direction, "logistic": logistic_direction, "ridge": ridge_direction}
    if method not in make:
        raise InputError(f"unknown method {method!r}; use one of {', '.join([*make, 'neurons'])}.")
    extra = {} if method == "ridge" else {"positive": y.max()}
    return make[method](X, y, model_key=model_key, hook=hook, description=f"{method} of {about}" if about else "", **extra)


def direction_from_entry(acts: CachedActivations, hook: str, label: LabelSpec, rule: str, method: str, *, model_key: str,
                         neurons: Sequence[int] = ()) -> tuple[Direction, np.ndarray, np.ndarray]:
    """:func:`direction_from_data` on a cache entry's rows of a token label (``regression_data``'s selection).

    Args:
        acts: the cache entry; hook: one of its hooks; label: the token label; rule: the position rule
            ("all", "last", "match:TOK,TOK").

    Returns:
        ``(direction, rows, y)``: the entry rows used and their labels (for downstream and amnesic probes).

    Raises:
        ProbingError: see ``regression_data`` and :func:`direction_from_data`.
    """
    from probing_core.analyses.regression import regression_data

    X, y, info = regression_data(acts, [hook], label, rule)
    d = direction_from_data(method, X[hook], y, model_key=model_key, hook=hook, neurons=neurons, about=info.description)
    return d, info.rows, y


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
