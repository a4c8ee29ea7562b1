"""Logit lens, next-token view, logit difference and direct logit attribution.

Every function takes a :class:`~probing_core.models.LoadedModel` (compatibility mode, so the
final LayerNorm is folded into ``W_U``/``b_U`` as TransformerLens does) and returns a frozen
dataclass of CPU numpy arrays. Figures live in :mod:`probing_core.plots.lens`.

Conventions (documented choices):

* Prompts get the model's BOS token prepended (as ``utils.test_prompt(..., prepend_bos=True)``)
  unless ``prepend_bos=False``. Results depend on it (the BOS position is an attention sink): the
  pages and the CLI (``--no-bos``) show the choice.
* Logits are the compatibility-mode logits: the unembedding is centred, so every logit is the raw
  logit minus its mean over the vocabulary at that position. Probabilities, ranks and logit
  differences are unchanged by that shift; the tables call the column ``logit (centred)``.
* Ranks are **0-based** over the full vocabulary (0 = the top token; ties count only strictly
  larger logits), as TransformerLens's own logit-lens tools report them.
* An answer must be **one token**. A multi-token answer is refused, and the message shows what it
  splits into (comparing the first token only would silently measure something else).
* The logit lens applies the final norm with statistics recomputed for every layer's residual
  (``accumulated_resid(apply_ln=True)``: ``ln_final`` then ``unembed``), so its last row is the
  model's own logits. Attribution instead divides every component by the *cached* final-norm
  scale of the final position (``apply_ln_to_stack(layer=-1, pos_slice=-1)``), which makes the
  components add up exactly to the model's logit difference.
* Logit differences compare each prompt's own last position, so prompts of different token
  lengths are allowed unless ``require_same_length=True`` (for analyses where positions must
  align across prompts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import torch

from probing_core.errors import InputError
from probing_core.models import LoadedModel, as_numpy

#: Cap on prompt length for the per-position views (CPU cost grows with layers × pos × vocab).
DEFAULT_MAX_TOKENS = 512

# ---------------------------------------------------------------------------------------------
# Sentiment templates (from the reference notebook; leading spaces live in the template).
# ---------------------------------------------------------------------------------------------

POSITIVE_ADJECTIVES: tuple[str, ...] = (
    "perfect", "fantastic", "delightful", "cheerful", "marvelous", "good", "remarkable", "wonderful",
    "fabulous", "outstanding", "awesome", "exceptional", "incredible", "extraordinary",
    "amazing", "lovely", "brilliant", "charming", "terrific", "superb", "spectacular", "great", "splendid",
    "beautiful", "joyful", "positive", "excellent",
)
NEGATIVE_ADJECTIVES: tuple[str, ...] = (
    "dreadful", "bad", "dull", "depressing", "miserable", "tragic", "nasty", "inferior", "horrific", "terrible",
    "ugly", "disgusting", "disastrous", "horrendous", "annoying", "boring", "offensive", "frustrating", "wretched", "dire",
    "awful", "unpleasant", "horrible", "mediocre", "disappointing", "inadequate",
)
SENTIMENT_TEMPLATE = (
    "This movie was a {adj} viewing experience, and the plot and acting were {adj2}. Overall, the film was"
)
SENTIMENT_ANSWERS: dict[str, tuple[str, str]] = {
    "positive": (" great", " awful"),
    "negative": (" awful", " great"),
}


@dataclass(frozen=True)
class PromptSet:
    """Prompts with one (correct, incorrect) answer pair each.

    Attributes:
        prompts: the prompt texts.
        answers: per prompt, (correct answer, incorrect answer) — each must be one token.
        classes: per prompt, a class label ("positive"/"negative" for templates, "" otherwise).
    """

    prompts: tuple[str, ...]
    answers: tuple[tuple[str, str], ...]
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.classes:
            object.__setattr__(self, "classes", tuple("" for _ in self.prompts))

    def __len__(self) -> int:
        return len(self.prompts)


def sentiment_prompt_set(n_pairs: int | None = None) -> PromptSet:
    """The notebook's sentiment templates: positive and negative reviews, interleaved.

    Prompt ``i`` of a class uses adjectives ``i`` and ``i+1`` of that class's list; positive
    prompts answer (" great", " awful"), negative ones (" awful", " great").

    Args:
        n_pairs: how many (positive, negative) pairs; default all 25.

    Returns:
        A :class:`PromptSet` of ``2 * n_pairs`` prompts.

    Raises:
        InputError: if ``n_pairs`` is not in 1…25.
    """
    max_pairs = min(len(POSITIVE_ADJECTIVES), len(NEGATIVE_ADJECTIVES)) - 1
    n = max_pairs if n_pairs is None else int(n_pairs)
    if not 1 <= n <= max_pairs:
        raise InputError(f"number of template pairs must be between 1 and {max_pairs}, got {n_pairs}.")
    prompts: list[str] = []
    answers: list[tuple[str, str]] = []
    classes: list[str] = []
    for i in range(n):
        for cls, adjs in (("positive", POSITIVE_ADJECTIVES), ("negative", NEGATIVE_ADJECTIVES)):
            prompts.append(SENTIMENT_TEMPLATE.format(adj=adjs[i], adj2=adjs[i + 1]))
            answers.append(SENTIMENT_ANSWERS[cls])
            classes.append(cls)
    return PromptSet(tuple(prompts), tuple(answers), tuple(classes))


def parse_prompt_lines(text: str) -> PromptSet:
    """Parse user prompts, one per line: ``prompt | correct | incorrect``.

    Answers are stripped and given one leading space (the usual form of a next word, " Paris");
    put an answer in double quotes to keep it exactly as written (``"ing"``).

    Raises:
        InputError: no lines, or a line without exactly three ``|``-separated fields.
    """
    prompts: list[str] = []
    answers: list[tuple[str, str]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) != 3:
            raise InputError(
                f"line {n} ({line.strip()[:60]!r}) needs three fields separated by '|': "
                "prompt | correct answer | incorrect answer."
            )
        prompt = parts[0].rstrip()
        if not prompt.strip():
            raise InputError(f"line {n} has an empty prompt.")
        prompts.append(prompt)
        answers.append((_answer_text(parts[1], n), _answer_text(parts[2], n)))
    if not prompts:
        raise InputError("no prompts given; write one per line as: prompt | correct answer | incorrect answer.")
    return PromptSet(tuple(prompts), tuple(answers))


def _answer_text(raw: str, line: int) -> str:
    s = raw.strip()
    if len(s) >= 2 and s[0] == s[-1] == '"':
        s = s[1:-1]
        if not s:
            raise InputError(f"line {line} has an empty quoted answer.")
        return s
    if not s:
        raise InputError(f"line {line} has an empty answer.")
    return " " + s


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def encode_prompt(model: LoadedModel, prompt: str, *, max_tokens: int | None = None, what: str = "prompt",
                  prepend_bos: bool = True) -> list[int]:
    """Tokenize ``prompt`` (with BOS first unless ``prepend_bos=False``) and check it fits the model.

    Raises:
        InputError: empty prompt, or longer than ``n_ctx`` / ``max_tokens``.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"the {what} is empty; type some text.")
    ids = model.encode(prompt, prepend_bos=bool(prepend_bos))
    if not ids:
        raise InputError(f"the {what} encodes to no tokens; type some text.")
    if len(ids) > model.n_ctx:
        raise InputError(
            f"the {what} is {len(ids)} tokens (with BOS) but the model's context is {model.n_ctx} tokens; shorten it."
        )
    if max_tokens is not None and len(ids) > max_tokens:
        raise InputError(
            f"the {what} is {len(ids)} tokens (with BOS); this view is limited to {max_tokens} tokens to stay "
            "fast — shorten it."
        )
    return ids


def single_token_id(model: LoadedModel, answer: str, *, what: str = "answer") -> int:
    """The id of a one-token answer.

    Raises:
        InputError: empty answer, or an answer that is several tokens (the split is shown).
    """
    if not isinstance(answer, str) or answer == "":
        raise InputError(f"the {what} is empty; give one token such as ' great'.")
    ids = model.tokenizer.encode(answer)
    if len(ids) == 1:
        return int(ids[0])
    if not ids:
        raise InputError(f"the {what} {answer!r} encodes to no tokens; give one token such as ' great'.")
    pieces = model.to_str_tokens(ids)
    hint = ""
    if not answer.startswith(" ") and len(model.tokenizer.encode(" " + answer)) == 1:
        hint = f" Did you mean {' ' + answer!r} (with a leading space)? It is one token."
    raise InputError(
        f"the {what} {answer!r} is {len(ids)} tokens ({pieces}); this analysis compares single next tokens, "
        f"so give an answer that is one token (for example its first piece {pieces[0]!r}).{hint}"
    )


def _check_k(model: LoadedModel, k: int) -> int:
    k = int(k)
    if not 1 <= k <= model.d_vocab:
        raise InputError(f"top-k must be between 1 and the vocabulary size {model.d_vocab}, got {k}.")
    return k


def _rank(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of ``ids`` in ``logits`` along the last axis: count of strictly larger logits."""
    target = logits.gather(-1, ids.unsqueeze(-1))
    return (logits > target).sum(-1)


# ---------------------------------------------------------------------------------------------
# Next-token view
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NextTokenResult:
    """Top-k next tokens after a prompt (like TransformerLens ``utils.test_prompt``).

    Attributes:
        prompt: the prompt text.
        tokens: [pos] the prompt's tokens as text (BOS first).
        token_ids: [pos] int64.
        top_ids: [k] int64, best first.
        top_tokens: [k] token texts.
        top_logits: [k] float32 centred logits (raw logit − its mean over the vocabulary; compatibility
            mode centres the unembedding). ``answer_logit`` is centred the same way.
        prepend_bos: whether BOS was prepended to the prompt.
        top_probs: [k] float32 softmax probabilities.
        answer: the answer asked about, if any; ``answer_id``, ``answer_logit``,
            ``answer_prob`` and ``answer_rank`` (0-based) describe it.
    """

    prompt: str
    tokens: list[str]
    token_ids: np.ndarray
    top_ids: np.ndarray
    top_tokens: list[str]
    top_logits: np.ndarray
    top_probs: np.ndarray
    answer: str | None = None
    answer_id: int | None = None
    answer_logit: float | None = None
    answer_prob: float | None = None
    answer_rank: int | None = None
    prepend_bos: bool = True

    def rows(self) -> list[dict[str, Any]]:
        """One dict per top-k token (for tables and CSV); the logit column is centred (see the class doc)."""
        return [
            {"rank": i, "token": t, "token_id": int(tid), "logit (centred)": float(lg), "prob": float(p)}
            for i, (t, tid, lg, p) in enumerate(zip(self.top_tokens, self.top_ids, self.top_logits, self.top_probs))
        ]

    def first(self, k: int) -> NextTokenResult:
        """The same result with only the ``k`` best tokens (a top-k slider move needs no new forward pass)."""
        return replace(self, top_ids=self.top_ids[:k], top_tokens=self.top_tokens[:k], top_logits=self.top_logits[:k],
                       top_probs=self.top_probs[:k])

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "prepend_bos": self.prepend_bos,
            "tokens": self.tokens,
            "top_k": self.rows(),
            "answer": None if self.answer is None else {
                "text": self.answer, "token_id": self.answer_id, "logit (centred)": self.answer_logit,
                "prob": self.answer_prob, "rank": self.answer_rank,
            },
        }


def next_token_topk(model: LoadedModel, prompt: str, *, k: int = 10, answer: str | None = None,
                    prepend_bos: bool = True) -> NextTokenResult:
    """Top-k next tokens after ``prompt`` with logits and probabilities.

    Args:
        model: a loaded model.
        prompt: the text (BOS is prepended).
        k: how many tokens to list (1…d_vocab).
        answer: optional one-token answer whose logit, probability and rank to report.
        prepend_bos: put the BOS token first (the default, as TransformerLens does).

    Returns:
        A :class:`NextTokenResult`.

    Raises:
        InputError: empty or too-long prompt, bad k, multi-token answer.
    """
    k = _check_k(model, k)
    ids = encode_prompt(model, prompt, prepend_bos=prepend_bos)
    answer_id = single_token_id(model, answer) if answer is not None else None
    logits = model.logits(torch.tensor([ids]))[0, -1].to(torch.float32)  # [d_vocab]
    log_probs = logits.log_softmax(-1)
    top = torch.topk(logits, k)
    top_ids = as_numpy(top.indices).astype(np.int64)
    out: dict[str, Any] = {}
    if answer_id is not None:
        a = torch.tensor([answer_id], device=logits.device)
        out = dict(
            answer=answer,
            answer_id=answer_id,
            answer_logit=float(logits[answer_id]),
            answer_prob=float(log_probs[answer_id].exp()),
            answer_rank=int(_rank(logits[None], a)[0]),
        )
    return NextTokenResult(
        prompt=prompt,
        tokens=model.to_str_tokens(ids),
        token_ids=np.asarray(ids, dtype=np.int64),
        top_ids=top_ids,
        top_tokens=model.to_str_tokens(top_ids.tolist()),
        top_logits=as_numpy(top.values),
        top_probs=as_numpy(log_probs[top.indices].exp()),
        prepend_bos=bool(prepend_bos),
        **out,
    )


# ---------------------------------------------------------------------------------------------
# Logit lens
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogitLensResult:
    """What each layer's residual stream predicts at every position.

    Rows ("layers") are ``{i}_pre`` (the input to block i), optionally ``{i}_mid``, and
    ``final_post`` (the residual after the last block: its row is the model's own prediction).

    Attributes:
        prompt: the prompt text.
        tokens: [pos] token texts (BOS first).
        token_ids: [pos] int64.
        labels: [layer] row labels as TransformerLens's ``accumulated_resid`` names them.
        top_ids: [layer, pos, k] int64.
        top_tokens: nested [layer][pos][k] token texts.
        top_probs: [layer, pos, k] float32.
        next_ids: [pos] the actual next token (-1 at the last position).
        next_prob: [layer, pos] probability of the actual next token (NaN at the last position).
        next_rank: [layer, pos] its 0-based rank (-1 at the last position).
        input_prob: [layer, pos] probability assigned to the position's own (input) token.
    """

    prompt: str
    tokens: list[str]
    token_ids: np.ndarray
    labels: list[str]
    top_ids: np.ndarray
    top_tokens: list[list[list[str]]]
    top_probs: np.ndarray
    next_ids: np.ndarray
    next_prob: np.ndarray
    next_rank: np.ndarray
    input_prob: np.ndarray
    prepend_bos: bool = True

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[-1])

    def summary(self) -> dict[str, Any]:
        """Row labels, tokens and the model's own top-1 token at every position (the final row), for a manifest."""
        return {"layers": self.labels, "tokens": self.tokens,
                "final_top1": [self.top_tokens[-1][p][0] for p in range(len(self.tokens))]}

    def rows(self) -> list[dict[str, Any]]:
        """Long-form rows (layer, position, rank-in-top-k) for CSV export."""
        out = []
        for li, lab in enumerate(self.labels):
            for p, tok in enumerate(self.tokens):
                for r in range(self.k):
                    out.append({
                        "layer": lab, "position": p, "input_token": tok, "k": r,
                        "token": self.top_tokens[li][p][r], "token_id": int(self.top_ids[li, p, r]),
                        "prob": float(self.top_probs[li, p, r]),
                        "next_token_prob": float(self.next_prob[li, p]), "next_token_rank": int(self.next_rank[li, p]),
                    })
        return out


def logit_lens(
    model: LoadedModel, prompt: str, *, k: int = 5, incl_mid: bool = False, max_tokens: int | None = DEFAULT_MAX_TOKENS,
    prepend_bos: bool = True,
) -> LogitLensResult:
    """Read every layer's residual stream through ``ln_final`` and the unembedding.

    Args:
        model: a loaded model.
        prompt: the text (BOS is prepended).
        k: top tokens kept per layer and position.
        incl_mid: also read ``resid_mid`` (after attention, before the MLP) of every block.
        max_tokens: refuse prompts longer than this (None: only the context limit).
        prepend_bos: put the BOS token first (the default).

    Returns:
        A :class:`LogitLensResult` with ``n_layers + 1`` rows (``2 * n_layers + 1`` with mids).

    Raises:
        InputError: empty or too-long prompt, bad k.
    """
    k = _check_k(model, k)
    ids = encode_prompt(model, prompt, max_tokens=max_tokens, prepend_bos=prepend_bos)
    T = len(ids)
    n = model.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    if incl_mid:
        names += [f"blocks.{i}.hook_resid_mid" for i in range(n)]
    names_set = set(names)
    tokens = torch.tensor([ids])
    bridge = model.bridge
    next_ids = torch.tensor(ids[1:] + [-1])
    own_ids = torch.tensor(ids)
    top_ids, top_probs, next_prob, next_rank, input_prob = [], [], [], [], []
    # Hold the lock for the post-processing too: ln_final/unembed fire hook points that a
    # concurrent run_with_cache on the shared model would otherwise record.
    with model.lock, torch.inference_mode():
        _, cache = bridge.run_with_cache(tokens.to(model.device), names_filter=lambda nm: nm in names_set)
        stack, labels = cache.accumulated_resid(incl_mid=incl_mid, apply_ln=True, return_labels=True)
        L = stack.shape[0]
        flat_resid = stack[:, 0].reshape(L * T, -1)  # [layer*pos, d_model]
        row_next = next_ids.repeat(L)
        row_own = own_ids.repeat(L)
        # Rows in chunks of ~16M logits: one W_U read per chunk (reading W_U per layer dominated
        # the cost) without materializing [layer, pos, d_vocab] for long prompts.
        chunk = max(1, (1 << 24) // model.d_vocab)
        for s0 in range(0, L * T, chunk):
            lg = bridge.unembed(flat_resid[None, s0:s0 + chunk])[0].to("cpu", torch.float32)
            lp = lg.log_softmax(-1)
            t = torch.topk(lg, k)
            nxt = row_next[s0:s0 + chunk]
            valid = nxt >= 0
            safe = nxt.clamp(min=0)
            top_ids.append(t.indices)
            top_probs.append(lp.gather(-1, t.indices).exp())
            npb = lp.gather(-1, safe[:, None])[:, 0].exp()
            next_prob.append(torch.where(valid, npb, torch.full_like(npb, math.nan)))
            next_rank.append(torch.where(valid, _rank(lg, safe), torch.full_like(safe, -1)))
            input_prob.append(lp.gather(-1, row_own[s0:s0 + chunk, None])[:, 0].exp())
    top_ids_np = torch.cat(top_ids).reshape(L, T, k).numpy().astype(np.int64)
    flat = model.to_str_tokens(top_ids_np.reshape(-1).tolist())
    top_tokens = [[flat[(li * T + p) * k:(li * T + p + 1) * k] for p in range(T)] for li in range(L)]
    return LogitLensResult(
        prompt=prompt,
        tokens=model.to_str_tokens(ids),
        token_ids=np.asarray(ids, dtype=np.int64),
        labels=list(labels),
        top_ids=top_ids_np,
        top_tokens=top_tokens,
        top_probs=torch.cat(top_probs).reshape(L, T, k).numpy(),
        next_ids=next_ids.numpy().astype(np.int64),
        next_prob=torch.cat(next_prob).reshape(L, T).numpy(),
        next_rank=torch.cat(next_rank).reshape(L, T).numpy().astype(np.int64),
        input_prob=torch.cat(input_prob).reshape(L, T).numpy(),
        prepend_bos=bool(prepend_bos),
    )


# ---------------------------------------------------------------------------------------------
# Logit difference and attribution
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    prompts: tuple[str, ...]
    token_ids: list[list[int]]
    answer_ids: np.ndarray  # [n, 2]
    answers: tuple[tuple[str, str], ...]
    classes: tuple[str, ...]


def _prepare(
    model: LoadedModel,
    prompts: Sequence[str] | PromptSet,
    answers: Sequence[tuple[str, str]] | tuple[str, str] | None,
    require_same_length: bool,
    max_tokens: int | None,
    prepend_bos: bool = True,
) -> _Prepared:
    classes: tuple[str, ...] = ()
    if isinstance(prompts, PromptSet):
        if answers is None:
            answers = prompts.answers
        classes = prompts.classes
        prompts = prompts.prompts
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = tuple(prompts)
    if not prompts:
        raise InputError("no prompts given.")
    if answers is None:
        raise InputError("give a (correct, incorrect) answer pair, one for all prompts or one per prompt.")
    if len(answers) == 2 and all(isinstance(a, str) for a in answers):
        answers = [tuple(answers)] * len(prompts)  # type: ignore[list-item]
    answers = tuple((str(a[0]), str(a[1])) for a in answers)  # type: ignore[index]
    if len(answers) != len(prompts):
        raise InputError(f"{len(prompts)} prompts but {len(answers)} answer pairs; give one pair per prompt or one for all.")
    token_ids = []
    for i, p in enumerate(prompts):
        token_ids.append(encode_prompt(model, p, max_tokens=max_tokens, what=f"prompt {i + 1}" if len(prompts) > 1 else "prompt",
                                       prepend_bos=prepend_bos))
    if require_same_length:
        n0 = len(token_ids[0])
        for i, t in enumerate(token_ids[1:], start=1):
            if len(t) != n0:
                raise InputError(
                    f"prompt {i + 1} ({prompts[i][:50]!r}) is {len(t)} tokens but prompt 1 ({prompts[0][:50]!r}) is "
                    f"{n0} tokens; positions must align here, so use prompts of equal token length "
                    "(e.g. swap in words that are single tokens)."
                )
    cache_ids: dict[str, int] = {}
    pairs = []
    for i, (c, w) in enumerate(answers):
        where = f" of prompt {i + 1}" if len(prompts) > 1 else ""
        if c not in cache_ids:
            cache_ids[c] = single_token_id(model, c, what=f"correct answer{where}")
        if w not in cache_ids:
            cache_ids[w] = single_token_id(model, w, what=f"incorrect answer{where}")
        if cache_ids[c] == cache_ids[w]:
            raise InputError(f"the correct and incorrect answers{where} are the same token {c!r}; pick two different tokens.")
        pairs.append((cache_ids[c], cache_ids[w]))
    if not classes:
        classes = tuple("" for _ in prompts)
    return _Prepared(prompts, token_ids, np.asarray(pairs, dtype=np.int64), answers, classes)


def _length_groups(token_ids: list[list[int]]) -> list[list[int]]:
    """Indices of prompts grouped by token length (each group is one padded-free batch)."""
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(token_ids):
        groups.setdefault(len(t), []).append(i)
    return list(groups.values())


@dataclass(frozen=True)
class LogitDiffResult:
    """Logit difference (correct − incorrect) at each prompt's last position.

    Attributes:
        prompts: the prompts.
        answers: per prompt (correct, incorrect).
        classes: per prompt class label ("" when none).
        answer_ids: [prompt, 2] int64.
        correct_logit, incorrect_logit: [prompt] float32.
        correct_prob, incorrect_prob: [prompt] float32.
        logit_diff: [prompt] float32 = correct_logit − incorrect_logit.
        mean: mean of ``logit_diff``.
        n_tokens: [prompt] token counts (with BOS when ``prepend_bos``).
        prepend_bos: whether BOS was prepended.
        logit_diff_ci: 95 % bootstrap interval of ``mean`` over the prompts (NaN for one prompt).
    """

    prompts: tuple[str, ...]
    answers: tuple[tuple[str, str], ...]
    classes: tuple[str, ...]
    answer_ids: np.ndarray
    correct_logit: np.ndarray
    incorrect_logit: np.ndarray
    correct_prob: np.ndarray
    incorrect_prob: np.ndarray
    logit_diff: np.ndarray
    mean: float
    n_tokens: np.ndarray
    prepend_bos: bool = True
    logit_diff_ci: tuple[float, float] = (float("nan"), float("nan"))

    def n_note(self) -> str:
        """How many prompts the mean rests on, with its 95 % bootstrap interval when there are several."""
        ci = self.logit_diff_ci
        return f"n = {len(self.prompts)} prompts" + (f"; 95 % bootstrap CI {ci[0]:.3f}…{ci[1]:.3f}" if len(self.prompts) > 1 else "")

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"prompt": p, "class": c, "correct": a[0], "incorrect": a[1], "n_tokens": int(n),
             "correct_logit": float(cl), "incorrect_logit": float(il), "correct_prob": float(cp),
             "incorrect_prob": float(ip), "logit_diff": float(d)}
            for p, c, a, n, cl, il, cp, ip, d in zip(
                self.prompts, self.classes, self.answers, self.n_tokens, self.correct_logit, self.incorrect_logit,
                self.correct_prob, self.incorrect_prob, self.logit_diff)
        ]


def logit_difference(
    model: LoadedModel,
    prompts: Sequence[str] | PromptSet,
    answers: Sequence[tuple[str, str]] | tuple[str, str] | None = None,
    *,
    require_same_length: bool = False,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    prepend_bos: bool = True,
) -> LogitDiffResult:
    """Logit of the correct minus the incorrect answer after each prompt.

    Args:
        model: a loaded model.
        prompts: prompt texts, or a :class:`PromptSet` (then ``answers`` defaults to its own).
        answers: one (correct, incorrect) pair for all prompts, or one pair per prompt.
        require_same_length: refuse prompts of different token lengths.
        max_tokens: per-prompt length cap.
        prepend_bos: put the BOS token first (the default; the difference depends on it).

    Returns:
        A :class:`LogitDiffResult`.

    Raises:
        InputError: empty prompt, multi-token or identical answers, length mismatch.
    """
    prep = _prepare(model, prompts, answers, require_same_length, max_tokens, prepend_bos)
    n = len(prep.prompts)
    cl, il, cp, ip = (np.zeros(n, np.float32) for _ in range(4))
    for group in _length_groups(prep.token_ids):
        toks = torch.tensor([prep.token_ids[i] for i in group])
        last = model.logits(toks)[:, -1].to("cpu", torch.float32)  # [batch, d_vocab]
        lp = last.log_softmax(-1)
        a = torch.from_numpy(prep.answer_ids[group])
        cl[group] = last.gather(1, a[:, :1])[:, 0].numpy()
        il[group] = last.gather(1, a[:, 1:])[:, 0].numpy()
        cp[group] = lp.gather(1, a[:, :1])[:, 0].exp().numpy()
        ip[group] = lp.gather(1, a[:, 1:])[:, 0].exp().numpy()
    diff = cl - il
    return LogitDiffResult(
        prompts=prep.prompts, answers=prep.answers, classes=prep.classes, answer_ids=prep.answer_ids,
        correct_logit=cl, incorrect_logit=il, correct_prob=cp, incorrect_prob=ip,
        logit_diff=diff, mean=float(diff.mean()), n_tokens=np.asarray([len(t) for t in prep.token_ids]),
        prepend_bos=bool(prepend_bos), logit_diff_ci=_mean_ci(diff),
    )


def _mean_ci(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean over prompts ((nan, nan) below 2 prompts)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float("nan"), float("nan")
    means = v[np.random.default_rng(seed).integers(0, v.size, size=(n_boot, v.size))].mean(1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return float(lo), float(hi)


@dataclass(frozen=True)
class AttributionResult:
    """Direct logit attribution of the logit difference at the last position, averaged over prompts.

    All components are divided by the cached final-norm scale of the last position
    (``ActivationCache.apply_ln_to_stack(layer=-1, pos_slice=-1)``) and projected on
    ``W_U[:, correct] − W_U[:, incorrect]``.

    Attributes:
        prompts, answers, classes: as in :class:`LogitDiffResult`.
        accumulated_labels: [n_acc] ``0_pre``, ``0_mid``, …, ``final_post``.
        accumulated: [n_acc] mean logit difference read from the accumulated residual.
        accumulated_per_prompt: [n_acc, prompt].
        decomposition_labels: [n_comp] ``embed``, (``pos_embed``), ``{l}_attn_out``, ``{l}_mlp_out``,
            plus ``unembed_bias`` when the unembedding bias differs between the two answers.
        decomposition: [n_comp] mean contribution of each component.
        decomposition_per_prompt: [n_comp, prompt].
        head_dla: [layer, head] mean direct logit attribution of each head (without ``b_O``).
        head_dla_per_prompt: [layer, head, prompt].
        head_remainder: mean of what the heads do not explain (embeddings, MLPs, biases).
        model_logit_diff_per_prompt: [prompt] from the model's logits.
        model_logit_diff: mean of it.
        decomposition_sum: sum of ``decomposition`` (should equal ``model_logit_diff``).
        max_abs_error: max over prompts of |component sum − model logit difference|.
    """

    prompts: tuple[str, ...]
    answers: tuple[tuple[str, str], ...]
    classes: tuple[str, ...]
    accumulated_labels: list[str]
    accumulated: np.ndarray
    accumulated_per_prompt: np.ndarray
    decomposition_labels: list[str]
    decomposition: np.ndarray
    decomposition_per_prompt: np.ndarray
    head_dla: np.ndarray
    head_dla_per_prompt: np.ndarray
    head_remainder: float
    model_logit_diff_per_prompt: np.ndarray
    model_logit_diff: float
    decomposition_sum: float
    max_abs_error: float
    notes: list[str] = field(default_factory=list)
    prepend_bos: bool = True

    @property
    def accumulated_x(self) -> np.ndarray:
        """x positions of the accumulated rows in layer units (``3_mid`` → 3.5, ``final_post`` → n_layers)."""
        xs = []
        for lab in self.accumulated_labels:
            if lab == "final_post":
                xs.append(float(self.head_dla.shape[0]))
            else:
                i, kind = lab.split("_")
                xs.append(int(i) + (0.5 if kind == "mid" else 0.0))
        return np.asarray(xs)

    def accumulated_rows(self) -> list[dict[str, Any]]:
        return [{"component": n, "layer_x": float(x), "logit_diff": float(v)}
                for n, x, v in zip(self.accumulated_labels, self.accumulated_x, self.accumulated)]

    def decomposition_rows(self) -> list[dict[str, Any]]:
        return [{"component": n, "logit_diff": float(v)} for n, v in zip(self.decomposition_labels, self.decomposition)]

    def head_rows(self) -> list[dict[str, Any]]:
        L, H = self.head_dla.shape
        return [{"layer": li, "head": h, "logit_diff": float(self.head_dla[li, h])} for li in range(L) for h in range(H)]

    @property
    def adds_up(self) -> bool:
        """The components sum to the model's logit difference: within 1e-3 of max(1, |logit difference|)."""
        return self.max_abs_error <= 1e-3 * max(1.0, abs(self.model_logit_diff))

    def sum_message(self) -> str:
        """One line saying whether the per-layer components add up (and, if not, why the notes think so)."""
        if self.adds_up:
            return "The per-layer components add up to the model's logit difference."
        return " ".join(self.notes) or "Components do not add up."

    def check(self) -> dict[str, float]:
        return {"decomposition_sum": self.decomposition_sum, "model_logit_diff": self.model_logit_diff,
                "max_abs_error": self.max_abs_error}


_ATTR_HOOK_SUFFIXES = (
    "hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
    "hook_attn_out", "hook_mlp_out", "attn.hook_z", "ln_final.hook_scale",
)


def _attr_filter(name: str) -> bool:
    return name.endswith(_ATTR_HOOK_SUFFIXES)


def logit_attribution(
    model: LoadedModel,
    prompts: Sequence[str] | PromptSet,
    answers: Sequence[tuple[str, str]] | tuple[str, str] | None = None,
    *,
    incl_mid: bool = True,
    require_same_length: bool = False,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    prepend_bos: bool = True,
) -> AttributionResult:
    """Accumulated-residual logit lens, per-layer decomposition and per-head DLA of the logit difference.

    Args:
        model: a loaded model.
        prompts: prompt texts or a :class:`PromptSet`.
        answers: one (correct, incorrect) pair for all, or one per prompt.
        incl_mid: include ``resid_mid`` points in the accumulated curve.
        require_same_length: refuse prompts of different token lengths.
        max_tokens: per-prompt length cap.
        prepend_bos: put the BOS token first (the default).

    Returns:
        An :class:`AttributionResult`; ``max_abs_error`` says how well the parts add up.

    Raises:
        InputError: as :func:`logit_difference`.
    """
    prep = _prepare(model, prompts, answers, require_same_length, max_tokens, prepend_bos)
    n_p = len(prep.prompts)
    bridge = model.bridge
    L, H = model.n_layers, model.n_heads
    acc_all = acc_labels = dec_all = dec_labels = heads_all = None
    model_ld = np.zeros(n_p, np.float32)
    notes: list[str] = []
    with model.lock, torch.inference_mode():
        W_U = bridge.W_U  # [d_model, d_vocab]
        b_U = getattr(bridge, "b_U", None)
        for group in _length_groups(prep.token_ids):
            toks = torch.tensor([prep.token_ids[i] for i in group], device=model.device)
            a = torch.from_numpy(prep.answer_ids[group]).to(model.device)
            logits, cache = bridge.run_with_cache(toks, names_filter=_attr_filter)
            last = logits[:, -1].float()
            model_ld[group] = as_numpy(last.gather(1, a[:, :1])[:, 0] - last.gather(1, a[:, 1:])[:, 0])
            direction = (W_U[:, a[:, 0]] - W_U[:, a[:, 1]]).T.float()  # [batch, d_model]

            def project(stack: torch.Tensor) -> np.ndarray:
                scaled = cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1)
                return as_numpy(torch.einsum("cbd,bd->cb", scaled.float(), direction))

            acc, labs = cache.accumulated_resid(layer=-1, incl_mid=incl_mid, pos_slice=-1, return_labels=True)
            acc_p = project(acc)
            dec, dlabs = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
            dec_p = project(dec)
            if b_U is not None:
                bias = as_numpy(b_U[a[:, 0]] - b_U[a[:, 1]])
                if np.abs(bias).max() > 0:
                    dec_p = np.concatenate([dec_p, bias[None]], 0)
                    dlabs = list(dlabs) + ["unembed_bias"]
            heads = cache.stack_head_results(layer=-1, pos_slice=-1)
            heads_p = project(heads)  # [L*H, batch]
            if acc_all is None:
                acc_all = np.zeros((len(labs), n_p), np.float32)
                acc_labels = list(labs)
                heads_all = np.zeros((L * H, n_p), np.float32)
            if dec_all is None or len(dlabs) > len(dec_labels or []):
                # The bias row may appear only for some answer pairs; widen to the longest label list.
                new = np.zeros((len(dlabs), n_p), np.float32)
                if dec_all is not None:
                    new[: dec_all.shape[0]] = dec_all
                dec_all, dec_labels = new, list(dlabs)
            acc_all[:, group] = acc_p
            dec_all[: dec_p.shape[0], group] = dec_p
            heads_all[:, group] = heads_p
            del cache
    assert acc_all is not None and dec_all is not None and heads_all is not None
    comp_sum = dec_all.sum(0)
    head_dla_pp = heads_all.reshape(L, H, n_p)
    err = float(np.abs(comp_sum - model_ld).max())
    if err > 1e-2 * max(1.0, float(np.abs(model_ld).max())):
        notes.append(f"the components add up to the model's logit difference only within {err:.3g}; "
                     "this architecture may add terms the decomposition does not show.")
    return AttributionResult(
        prompts=prep.prompts, answers=prep.answers, classes=prep.classes,
        accumulated_labels=acc_labels or [], accumulated=acc_all.mean(1), accumulated_per_prompt=acc_all,
        decomposition_labels=dec_labels or [], decomposition=dec_all.mean(1), decomposition_per_prompt=dec_all,
        head_dla=head_dla_pp.mean(2), head_dla_per_prompt=head_dla_pp,
        head_remainder=float((model_ld - head_dla_pp.sum((0, 1))).mean()),
        model_logit_diff_per_prompt=model_ld, model_logit_diff=float(model_ld.mean()),
        decomposition_sum=float(dec_all.mean(1).sum()), max_abs_error=err, notes=notes,
        prepend_bos=bool(prepend_bos),
    )
