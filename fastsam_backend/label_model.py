"""Labels learned from a project's annotations: class prototypes over CLIP crop embeddings.

Each annotated region becomes one *example*: its label and the ``(D,)`` unit CLIP embedding of its
crop (the cached instance mask it matches, or the region's own mask). Per label, the prototype is
the normalised mean of its examples; an instance gets the label whose prototype is nearest
(cosine). Measured against a linear probe on the fixture CLIP (README, *Labels learned from
annotations*): prototypes were as good from 1 example on and need no training step, so any replica
rebuilds them from the stored examples in microseconds.

A label is *learned* once it has ``min_examples`` examples; labels that are not yet learned keep
their zero-shot score, per label (``choose_learned``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .zero_shot import LabelChoice


@dataclass(frozen=True)
class Example:
    """One annotated region: ``label`` and its ``(D,)`` float32 unit CLIP crop embedding."""

    label: str
    embedding: np.ndarray


@dataclass(frozen=True)
class LabelModel:
    """Prototypes of one project.

    Attributes:
        labels: ``(L,)`` label names, sorted.
        prototypes: ``(L, D)`` float32 unit vectors, row ``i`` for ``labels[i]``.
        counts: ``(L,)`` int examples per label.
        revision: the project's example-store revision these were built from.
        min_examples: a label with fewer examples is not used (zero-shot decides it).
    """

    labels: tuple[str, ...]
    prototypes: np.ndarray
    counts: np.ndarray
    revision: int
    min_examples: int

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.prototypes.ndim != 2 or self.prototypes.shape[0] != n or self.counts.shape != (n,):
            raise ValueError(f"{n} labels need (L, D) prototypes and (L,) counts, got "
                             f"{self.prototypes.shape} and {self.counts.shape}")

    @classmethod
    def empty(cls, min_examples: int, revision: int = 0) -> LabelModel:
        return cls((), np.zeros((0, 0), np.float32), np.zeros(0, np.int64), revision, min_examples)

    @classmethod
    def fit(cls, examples: Iterable[Example], *, min_examples: int, revision: int = 0) -> LabelModel:
        """Prototypes from examples (rows that are all zero, i.e. unscored crops, are skipped)."""
        by_label: dict[str, list[np.ndarray]] = {}
        for ex in examples:
            vec = np.asarray(ex.embedding, np.float32).reshape(-1)
            if vec.any():
                by_label.setdefault(ex.label, []).append(vec)
        if not by_label:
            return cls.empty(min_examples, revision)
        labels = tuple(sorted(by_label))
        protos = np.stack([np.mean(by_label[lab], axis=0) for lab in labels]).astype(np.float32)
        protos /= np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
        counts = np.array([len(by_label[lab]) for lab in labels], np.int64)
        return cls(labels, protos, counts, revision, min_examples)

    def count(self, label: str) -> int:
        return int(self.counts[self.labels.index(label)]) if label in self.labels else 0

    def learned(self, labels: Iterable[str]) -> tuple[str, ...]:
        """Those of ``labels`` with at least ``min_examples`` examples, in their order."""
        return tuple(lab for lab in labels if self.count(lab) >= self.min_examples)

    @property
    def version_tag(self) -> str | None:
        """What goes into ``model_version``: None while no label is learned (predictions are the
        zero-shot ones), else a digest of the learned labels, their counts and the revision."""
        used = self.learned(self.labels)
        if not used:
            return None
        canon = repr((self.revision, [(lab, self.count(lab)) for lab in used])).encode()
        return f"L{self.revision}.{hashlib.sha256(canon).hexdigest()[:6]}"

    def similarities(self, embeddings: np.ndarray, labels: tuple[str, ...]) -> np.ndarray:
        """``(N, len(labels))`` cosine of each ``(N, D)`` embedding to each label's prototype."""
        rows = [self.labels.index(lab) for lab in labels]
        return embeddings.astype(np.float32) @ self.prototypes[rows].T


def label_scores(embeddings: np.ndarray, phrase_embeddings: np.ndarray, owner: np.ndarray,
                 n_labels: int) -> np.ndarray:
    """``(N, n_labels)`` zero-shot cosine of each instance to each label (its best phrase)."""
    sims = embeddings.astype(np.float32) @ phrase_embeddings.astype(np.float32).T
    out = np.full((len(embeddings), n_labels), -1.0, np.float32)
    for label in range(n_labels):
        if (cols := owner == label).any():
            out[:, label] = sims[:, cols].max(axis=1)
    return out


def choose_learned(model: LabelModel, embeddings: np.ndarray, labels: tuple[str, ...],
                   zero_shot: LabelChoice | None, *, min_similarity: float,
                   default_label: str | None, text_scores: np.ndarray | None = None) -> LabelChoice:
    """Per instance the learned label when one fits, else the zero-shot one.

    Args:
        embeddings: ``(N, D)`` unit crop embeddings (zero rows: too small to score).
        labels: the tag's labels.
        zero_shot: the zero-shot choice among the tag's labels that are not learned (None when
            every label is learned, or CLIP text scoring is unavailable).
        min_similarity: the nearest learned prototype is accepted when its cosine is at least this,
            or whenever every label of the tag is learned (there is nothing else to pick).
        text_scores: ``(N, len(labels))`` zero-shot cosine of each instance to each label's words,
            when CLIP text scoring is there: once every label is learned, an instance gets the label
            of highest prototype cosine + text cosine (the words stay a prior; measured better than
            the prototypes alone on the fixture CLIP, README).

    An instance that neither places gets ``default_label`` or is dropped, as zero-shot does.
    """
    n = len(embeddings)
    learned = model.learned(labels)
    if not learned or n == 0:
        return zero_shot if zero_shot is not None else LabelChoice((default_label,) * n,
                                                                   np.full(n, default_label is not None))
    sims = model.similarities(embeddings, learned)
    everything_learned = len(learned) == len(labels)
    if everything_learned and text_scores is not None:
        sims = sims + text_scores[:, [labels.index(lab) for lab in learned]]
    best = sims.argmax(axis=1)
    best_sim = sims[np.arange(n), best]
    scored = embeddings.any(axis=1)
    accept = scored & (everything_learned | (best_sim >= min_similarity))
    out: list[str | None] = []
    keep = np.zeros(n, bool)
    for i in range(n):
        if accept[i]:
            out.append(learned[int(best[i])])
            keep[i] = True
        elif zero_shot is not None and zero_shot.labels[i] not in learned:
            out.append(zero_shot.labels[i])
            keep[i] = bool(zero_shot.keep[i])
        else:
            out.append(default_label)
            keep[i] = default_label is not None
    return LabelChoice(tuple(out), keep)
