"""Do a project's learned labels beat zero-shot on its own examples? Per output tag, a paired test.

Every stored example of the tag's labels is labelled twice: by zero-shot (the label whose words its
crop embedding is closest to) and by the learned model *without that example* (leave-one-out: its
label's prototype and geometry centroid rebuilt without it, its label not learned at all when it
has fewer than ``min_examples`` others), exactly as pre-annotation would label it
(``label_model.refine_zero_shot``: only an example zero-shot places on a learned label can move).
The examples where exactly one of the two is right are a paired comparison: learned decides the
tag only when it wins significantly more of them than it loses, a one-sided exact sign test at
``alpha`` (``LEARN_SIGNIFICANCE``). With a handful of examples no difference is significant
(1 win and 0 losses: p = 0.5; 5 and 0: p = 0.031), so zero-shot decides until the examples show
otherwise. Small optimism: the geometry weight and covariance were fitted with every example.

A function of the stored examples and the tag's phrase embeddings, so every replica decides alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Any

import numpy as np

from fastsam_backend.labels.label_model import LabelModel


@dataclass(frozen=True)
class Decision:
    """Who labels one tag's instances, and the leave-one-out figures that say why.

    Attributes:
        learned_decides: True: learned labels refine zero-shot; False: zero-shot alone.
        learned: the tag's labels with at least ``min_examples`` examples.
        examples: the tag's examples scored.
        learned_correct, zero_shot_correct: of those, labelled right by each.
        wins, losses: right by learned only, by zero-shot only (the sign test's pairs).
        p_value: one-sided exact sign test of ``wins`` against ``losses``.
        alpha: the significance learned must reach.
        per_label: label -> ``{"examples", "learned_correct", "zero_shot_correct"}``.
    """

    learned_decides: bool
    learned: tuple[str, ...]
    examples: int
    learned_correct: int
    zero_shot_correct: int
    wins: int
    losses: int
    p_value: float
    alpha: float
    per_label: dict[str, dict[str, int]]

    @property
    def reason(self) -> str:
        lo = (f"leave-one-out on {self.examples} examples: learned {self.learned_correct} right, zero-shot "
              f"{self.zero_shot_correct} ({self.wins} won, {self.losses} lost; sign test p = {self.p_value:.3g})")
        if not self.learned:
            return "no label has enough examples"
        if self.learned_decides:
            return f"learned is better: {lo} <= {self.alpha}"
        return f"learned is not measurably better: {lo} > {self.alpha}"

    def as_dict(self) -> dict[str, Any]:
        return {"decides": "learned" if self.learned_decides else "zero-shot", "reason": self.reason,
                "learned_labels": list(self.learned), "examples": self.examples,
                "learned_correct": self.learned_correct, "zero_shot_correct": self.zero_shot_correct,
                "wins": self.wins, "losses": self.losses, "p_value": round(self.p_value, 4), "alpha": self.alpha,
                "per_label": self.per_label}


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(at least ``wins`` of ``wins + losses`` fair coin flips); 1 with none."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(comb(n, k) for k in range(wins, n + 1)) / 2.0 ** n


def decide(model: LabelModel, labels: tuple[str, ...], text_scores: np.ndarray, *, alpha: float) -> Decision:
    """The decision for a tag's ``labels``.

    Args:
        model: the project's model (its ``examples``; those of other labels are not scored).
        text_scores: ``(len(model.examples), len(labels))`` zero-shot cosine of each example's
            embedding to each label's words (``label_model.label_scores``).
        alpha: learned decides when the sign test's p-value is at most this.
    """
    truth, zero, learned = loo_labels(model, labels, text_scores)
    per_label = {lab: {"examples": int((truth == k).sum()),
                       "learned_correct": int(((truth == k) & (learned == k)).sum()),
                       "zero_shot_correct": int(((truth == k) & (zero == k)).sum())}
                 for k, lab in enumerate(labels) if (truth == k).any()}
    right_l, right_z = learned == truth, zero == truth
    wins, losses = int((right_l & ~right_z).sum()), int((right_z & ~right_l).sum())
    p = sign_test_p(wins, losses)
    used = model.learned(labels)
    return Decision(bool(used) and p <= alpha, used, len(truth), int(right_l.sum()), int(right_z.sum()), wins, losses,
                    p, alpha, per_label)


def loo_labels(model: LabelModel, labels: tuple[str, ...],
               text_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(truth, zero_shot, learned)``: ``(n,)`` label indices into ``labels`` of the model's examples
    of those labels: their own, zero-shot's, and the leave-one-out learned one (see the module)."""
    examples = model.examples
    rows = [i for i, ex in enumerate(examples) if ex.label in labels]
    if not rows:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    n_l = len(labels)
    truth = np.array([labels.index(examples[i].label) for i in rows], np.int64)
    text = np.asarray(text_scores, np.float32)[rows]
    zero = text.argmax(axis=1)
    emb = np.stack([np.asarray(examples[i].embedding, np.float32).reshape(-1) for i in rows])
    counts = np.array([model.count(lab) for lab in labels], np.int64)
    # Per label the sum of its examples' embeddings (the prototype before normalising).
    sums = np.zeros((n_l, emb.shape[1]), np.float32)
    np.add.at(sums, truth, emb)
    protos = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    n = len(rows)
    own_loo = sums[truth] - emb
    own_loo /= np.maximum(np.linalg.norm(own_loo, axis=1, keepdims=True), 1e-12)
    scores = emb @ protos.T
    scores[np.arange(n), truth] = np.einsum("nd,nd->n", emb, own_loo)
    if (geo := _loo_geometry(model, labels, rows, truth)) is not None:
        scores = scores + geo
    # Which labels are learned once the example is left out: its own only with min_examples others.
    learned = np.tile(counts >= model.min_examples, (n, 1))
    learned[np.arange(n), truth] = counts[truth] - 1 >= model.min_examples
    refined = np.where(learned, scores, -np.inf).argmax(axis=1)
    moves = learned[np.arange(n), zero]  # zero-shot placed it on a label learned without it
    return truth, zero, np.where(moves, refined, zero)


def _loo_geometry(model: LabelModel, labels: tuple[str, ...], rows: list[int],
                  truth: np.ndarray) -> np.ndarray | None:
    """``(n, len(labels))`` weighted geometry scores of the examples ``rows``, own centroid without the
    example (0 for examples without geometry, and for labels the geometry model does not cover)."""
    geo = model.geometry
    if geo is None:
        return None
    examples = model.examples
    covered = [lab in model.labels and model.count(lab) >= model.min_examples for lab in labels]
    cols = [model.labels.index(lab) if ok else 0 for lab, ok in zip(labels, covered)]
    has = np.array([examples[i].geometry is not None and np.shape(examples[i].geometry) == geo.mean.shape
                    for i in rows])
    out = np.zeros((len(rows), len(labels)), np.float32)
    if not has.any():
        return out
    idx = np.flatnonzero(has)
    g = np.stack([np.asarray(examples[rows[i]].geometry, np.float32) for i in idx])
    z = (g - geo.mean) / geo.scale
    # The fitted centroid of a label averages its examples with geometry: as many as these.
    n_geo = np.bincount(truth[idx], minlength=len(labels))
    cent = geo.centroids[cols].copy()
    d = z[:, None, :] - cent[None]
    s = -0.5 * np.einsum("nlj,jk,nlk->nl", d, geo.precision, d) / z.shape[1]
    t = truth[idx]
    alone = n_geo[t] <= 1
    loo_c = (cent[t] * n_geo[t][:, None] - z) / np.maximum(n_geo[t] - 1, 1)[:, None]
    dd = z - loo_c
    own = -0.5 * np.einsum("nj,jk,nk->n", dd, geo.precision, dd) / z.shape[1]
    s[np.arange(len(idx)), t] = np.where(alone, -np.inf, own)
    s[:, ~np.array(covered)] = 0.0
    out[idx] = geo.weight * s
    return out
