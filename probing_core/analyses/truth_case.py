"""The literature case: is there a truth direction, and does steering along it move a TRUE/FALSE answer?

Following Marks & Tegmark, "The Geometry of Truth" (2023), on the built-in labelled statements
(:mod:`probing_core.data.statements`):

1. read the residual stream (``resid_post`` of every layer) at each statement's last token (the
   period), and probe truth per layer — a logistic probe, the mass-mean probe (projection on the
   difference of class means, threshold at the midpoint) and the same logistic probe on shuffled
   labels (the control), on held-out statements;
2. take the mass-mean direction at the best layer (fit on all probe statements);
3. steer a few-shot "… This statement is: True/False" prompt built around held-out statements, at
   the period and the tokens after it, by ``c · σ · d̂``, and read P(True) − P(False) for true and
   false statements as ``c`` moves — beside K random directions of the same norm
   (:func:`probing_core.analyses.interventions.steering_sweep`).

The embedded model has 135M parameters; the paper used 7B–70B. Report what it does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from probing_core.analyses.lens import single_token_id
from probing_core.analyses.interventions import (
    Direction,
    Progress,
    SteeringSweep,
    mass_mean_direction,
    steering_sweep,
)
from probing_core.data.datasets import Dataset
from probing_core.errors import InputError
from probing_core.models import LoadedModel, as_numpy

#: The answer pair: one token each in SmolLM2's and GPT-2's vocabularies (" TRUE" is two tokens).
ANSWERS = (" True", " False")
SUFFIX = " This statement is:"
DEFAULT_COEFS = (-8.0, -4.0, 4.0, 8.0)


def statement_features(model: LoadedModel, statements: Sequence[str], hooks: Sequence[str], *, batch_size: int = 32,
                       progress: Progress | None = None) -> np.ndarray:
    """Activations at each statement's last token (BOS prepended), for every hook.

    Rows are right-padded into batches; a causal model's last real token never sees the padding.

    Returns:
        [n_hooks, n_statements, width] float32.
    """
    model.check_hooks(hooks)
    widths = {model.hook_width(h) for h in hooks}
    if len(widths) != 1:
        raise InputError("read hooks of one width together (e.g. resid_post of every layer).")
    ids = [model.encode(s) for s in statements]
    out = np.zeros((len(hooks), len(ids), widths.pop()), np.float32)
    order = np.argsort([len(t) for t in ids], kind="stable")  # similar lengths batch together: less padding
    for s0 in range(0, len(ids), batch_size):
        part = order[s0:s0 + batch_size]
        L = max(len(ids[i]) for i in part)
        toks = torch.zeros((len(part), L), dtype=torch.int64)
        for j, i in enumerate(part):
            toks[j, :len(ids[i])] = torch.tensor(ids[i])
        last = torch.tensor([len(ids[i]) - 1 for i in part])
        _, cache = model.run_with_cache(toks, hooks)
        for h, name in enumerate(hooks):
            out[h, part] = as_numpy(cache[name][torch.arange(len(part)), last.to(cache[name].device)])
        if progress:
            progress(min(1.0, (s0 + len(part)) / len(ids)), f"reading statements {s0 + len(part)}/{len(ids)}")
    return out


@dataclass(frozen=True)
class TruthProbeCurve:
    """Truth probe accuracy per layer on held-out statements.

    Attributes:
        hooks: [n_hooks]; layers: [n_hooks] layer index of each.
        logistic, mass_mean, control: [n_hooks] test accuracy of the logistic probe, the mass-mean
            probe, and the logistic probe on shuffled labels.
        chance: majority-class rate of the test statements; n_train, n_test: counts.
        best_hook, best_accuracy: the layer with the highest logistic accuracy (first on ties).
    """

    hooks: list[str]
    layers: np.ndarray
    logistic: np.ndarray
    mass_mean: np.ndarray
    control: np.ndarray
    chance: float
    n_train: int
    n_test: int

    @property
    def best_index(self) -> int:
        return int(np.argmax(self.logistic))

    @property
    def best_hook(self) -> str:
        return self.hooks[self.best_index]

    @property
    def best_accuracy(self) -> float:
        return float(self.logistic[self.best_index])

    def rows(self) -> list[dict[str, Any]]:
        return [{"hook": h, "layer": int(li), "logistic": float(a), "mass_mean": float(m), "control": float(c)}
                for h, li, a, m, c in zip(self.hooks, self.layers, self.logistic, self.mass_mean, self.control)]


def probe_truth_by_layer(F: np.ndarray, y: np.ndarray, hooks: Sequence[str], *, seed: int = 0,
                         test_fraction: float = 0.3) -> TruthProbeCurve:
    """Logistic, mass-mean and shuffled-label probes per hook on a stratified split.

    Args:
        F: [n_hooks, n, width] features; y: [n] 0/1 labels.
    """
    from sklearn.linear_model import LogisticRegression

    from probing_core.solvers.splits import stratified_split

    y = np.asarray(y).astype(np.int64)
    train, test = stratified_split(y, test_fraction=test_fraction, seed=seed)
    shuffled = np.random.default_rng(seed).permutation(y)
    log_acc, mm_acc, ctl_acc = (np.zeros(len(hooks)) for _ in range(3))
    for h in range(len(hooks)):
        X = F[h].astype(np.float64)
        mu, sd = X[train].mean(0), X[train].std(0)
        sd[sd < 1e-8] = 1.0
        Z = (X - mu) / sd
        log_acc[h] = LogisticRegression(C=0.1, max_iter=2000).fit(Z[train], y[train]).score(Z[test], y[test])
        ctl_acc[h] = LogisticRegression(C=0.1, max_iter=2000).fit(Z[train], shuffled[train]).score(Z[test], shuffled[test])
        d = X[train][y[train] == 1].mean(0) - X[train][y[train] == 0].mean(0)
        p = X @ d
        thr = 0.5 * (p[train][y[train] == 1].mean() + p[train][y[train] == 0].mean())
        mm_acc[h] = float(((p[test] > thr).astype(int) == y[test]).mean())
    layers = np.array([int(hk.split(".")[1]) if hk.startswith("blocks.") else -1 for hk in hooks])
    chance = float(max(y[test].mean(), 1 - y[test].mean()))
    return TruthProbeCurve(list(hooks), layers, log_acc, mm_acc, ctl_acc, chance, int(train.size), int(test.size))


def few_shot_prompts(examples: Sequence[tuple[str, int]], statements: Sequence[str], answers: tuple[str, str] = ANSWERS,
                     suffix: str = SUFFIX) -> list[str]:
    """``"<s1> This statement is: True\\n<s2> This statement is: False\\n…<statement> This statement is:"``."""
    shots = "".join(f"{s}{suffix}{answers[0] if lab else answers[1]}\n" for s, lab in examples)
    return [f"{shots}{s}{suffix}" for s in statements]


@dataclass(frozen=True)
class TruthCaseResult:
    """The whole truth case: the per-layer curve, the direction at the best layer, and the steering sweep.

    Attributes:
        dataset: the statement set's name; curve: :class:`TruthProbeCurve`.
        direction: the mass-mean direction at ``curve.best_hook`` (fit on every probe statement).
        sweep: P(True) − P(False) on held-out statements as c moves, with the random band.
        examples: the few-shot examples (4, or 2 or 0 when 4 do not fit the context); positions: the steered positions' rule.
        seconds: {"features", "probes", "steering"} wall times.
    """

    dataset: str
    curve: TruthProbeCurve
    direction: Direction
    sweep: SteeringSweep
    examples: tuple[tuple[str, int], ...]
    positions: str
    seconds: dict[str, float]

    def summary(self) -> dict[str, Any]:
        """The figures a report needs: best layer and accuracy, the steering effect vs the random band at every c ≠ 0."""
        out: dict[str, Any] = {
            "dataset": self.dataset, "best_hook": self.curve.best_hook, "best_layer": int(self.curve.layers[self.curve.best_index]),
            "best_logistic_accuracy": self.curve.best_accuracy,
            "mass_mean_accuracy_at_best": float(self.curve.mass_mean[self.curve.best_index]),
            "control_accuracy_at_best": float(self.curve.control[self.curve.best_index]),
            "chance": self.curve.chance, "k_controls": int(self.sweep.controls.shape[0]), "seed": self.sweep.seed,
            "steering": {},
        }
        cs = self.sweep.coefs
        for ci in np.flatnonzero(cs != 0):
            for cls in ("true", "false", None):
                cmp = self.sweep.comparison(ci, cls)
                out["steering"][f"c={cs[ci]:+g} {cls or 'all'}"] = {
                    "delta": cmp.value, "random_mean": float(cmp.controls.mean()), "random_min": float(cmp.controls.min()),
                    "random_max": float(cmp.controls.max()), "percentile": cmp.percentile, "z": cmp.z,
                    "inside_band": cmp.inside_band}
        d = self.direction
        # the distance between the class means along d̂ in σ units: c of that size moves one class onto the other
        out["class_gap_sigma"] = float(d.norm / d.proj_std) if d.proj_std else None
        p0 = self.sweep.class_mean("true")[0][cs == 0][0], self.sweep.class_mean("false")[0][cs == 0][0]
        out["baseline_p_true_minus_p_false"] = {"true": float(p0[0]), "false": float(p0[1])}
        out["seconds"] = self.seconds
        return out


def truth_case(
    model: LoadedModel,
    dataset: Dataset,
    *,
    n_statements: int = 600,
    n_heldout: int = 6,
    coefs: Sequence[float] = DEFAULT_COEFS,
    k_controls: int = 20,
    seed: int = 0,
    answers: tuple[str, str] = ANSWERS,
    progress: Progress | None = None,
) -> TruthCaseResult:
    """Probe truth per layer, take the mass-mean direction at the best layer, steer held-out statements along it.

    Args:
        dataset: a labelled-statements dataset (one statement per document, 0/1 ``label`` column).
        n_statements: statements used for probing (balanced draw, seeded).
        n_heldout: held-out statements per class that the few-shot prompt is built around.
        coefs: steering strengths in σ units (0 is added).

    Raises:
        InputError: a dataset without a 0/1 label column, too few statements, multi-token answers, …
    """
    if len(answers) != 2:
        raise InputError("give the answer pair as two tokens, e.g. ' True | False'.")
    for what, a in zip(("first answer", "second answer"), answers):
        single_token_id(model, a, what=what)  # refuse a multi-token answer before minutes of work
    labels = dataset.columns.get("label")
    if labels is None or set(map(str, labels)) != {"0", "1"}:
        raise InputError("the truth case needs labelled statements (a 0/1 'label' column); pick a statement set.")
    y_all = np.array([int(v) for v in labels])
    rng = np.random.default_rng(seed)
    pos_i, neg_i = rng.permutation(np.flatnonzero(y_all == 1)), rng.permutation(np.flatnonzero(y_all == 0))
    n_each = min(len(pos_i), len(neg_i), n_statements // 2 + n_heldout + 2)
    if n_each < n_heldout + 20:
        raise InputError(f"too few statements per class ({n_each}) for {n_heldout} held-out ones and a probe.")
    held = np.concatenate([pos_i[:n_heldout], neg_i[:n_heldout]])
    shots_i = [pos_i[n_heldout], neg_i[n_heldout], neg_i[n_heldout + 1], pos_i[n_heldout + 1]]
    probe_i = np.sort(np.concatenate([pos_i[n_heldout + 2:n_each], neg_i[n_heldout + 2:n_each]]))
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(model.n_layers)]
    part = lambda lo, hi: (lambda f, m: progress(lo + (hi - lo) * f, m)) if progress else None  # noqa: E731
    t0 = time.perf_counter()
    F = statement_features(model, [dataset.documents[i] for i in probe_i], hooks, progress=part(0.0, 0.4))
    t1 = time.perf_counter()
    curve = probe_truth_by_layer(F, y_all[probe_i], hooks, seed=seed)
    t2 = time.perf_counter()
    b = curve.best_index
    direction = mass_mean_direction(F[b], y_all[probe_i], model_key=model.key, hook=hooks[b],
                                    description=f"truth: mass-mean of {probe_i.size} {dataset.spec.name or 'cities'} statements at their last token")
    for n_shots in (4, 2, 0):  # fewer examples when the prompts would not fit the model's context
        examples = tuple((dataset.documents[i], int(y_all[i])) for i in shots_i[:n_shots])
        prompts = few_shot_prompts(examples, [dataset.documents[i] for i in held], answers)
        if max(len(model.encode(p)) for p in prompts) <= model.n_ctx:
            break
    n_after = len(model.tokenizer.encode(SUFFIX)) + 1  # the period and the suffix's tokens
    positions = f"last:{n_after}"
    sweep = steering_sweep(model, prompts, direction, answers=answers, coefs=coefs, positions=positions,
                           classes=["true" if y_all[i] else "false" for i in held], k_controls=k_controls, seed=seed,
                           progress=part(0.4, 1.0))
    secs = {"features": t1 - t0, "probes": t2 - t1, "steering": sweep.seconds}
    return TruthCaseResult(dataset.spec.name or "cities", curve, direction, sweep, examples, positions, secs)
