"""Zero-shot labels: each instance gets the project label whose words its crop resembles most."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastsam_backend.ls.labelconfig import OutputTag


@dataclass(frozen=True)
class LabelPhrases:
    """Every phrase that names a label: its value and its ``predicted_values`` synonyms."""

    labels: tuple[str, ...]
    phrases: tuple[str, ...]
    owner: np.ndarray  # (P,) int: label index of each phrase

    @classmethod
    def of(cls, tag: OutputTag) -> LabelPhrases:
        phrases, owner = [], []
        for i, label in enumerate(tag.labels):
            for phrase in (label, *tag.synonyms.get(label, ())):
                phrases.append(phrase)
                owner.append(i)
        return cls(tag.labels, tuple(phrases), np.asarray(owner, dtype=np.int64))


def zero_shot(mask_embeddings: np.ndarray, phrase_embeddings: np.ndarray, owner: np.ndarray,
              n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Best label per instance.

    Args:
        mask_embeddings: ``(N, D)`` unit vectors (zero rows for unscored masks).
        phrase_embeddings: ``(P, D)`` unit vectors.
        owner: ``(P,)`` label index of each phrase.

    Returns:
        ``(labels, similarity)``: ``(N,)`` int label index and its ``(N,)`` cosine (a label's
        score is its best phrase).
    """
    sims = mask_embeddings.astype(np.float32) @ phrase_embeddings.astype(np.float32).T  # (N, P)
    per_label = np.full((len(mask_embeddings), n_labels), -np.inf, dtype=np.float32)
    for label in range(n_labels):
        cols = owner == label
        if cols.any():
            per_label[:, label] = sims[:, cols].max(axis=1)
    labels = per_label.argmax(axis=1) if n_labels else np.zeros(len(mask_embeddings), np.int64)
    best = per_label[np.arange(len(labels)), labels] if n_labels else np.full(len(labels), -np.inf)
    return labels, best


def label_named_in(text: str, labels: tuple[str, ...]) -> str | None:
    """The label a text names ('the red Banana' → 'Banana'), longest match first."""
    lowered = f" {text.lower()} "
    for label in sorted(labels, key=len, reverse=True):
        if f" {label.lower()} " in lowered or f" {label.lower()}s " in lowered:
            return label
    return None


@dataclass(frozen=True)
class LabelChoice:
    """Per instance its label (None: unlabelled) and whether to keep it at all."""

    labels: tuple[str | None, ...]
    keep: np.ndarray  # (N,) bool; False: CLIP could not place the instance and there is no default label

    @classmethod
    def uniform(cls, label: str | None, n: int) -> LabelChoice:
        return cls((label,) * n, np.ones(n, dtype=bool))


def choose_labels(mask_embeddings: np.ndarray, phrase_embeddings: np.ndarray, phrases: LabelPhrases, *,
                  min_similarity: float, default_label: str | None) -> LabelChoice:
    """Zero-shot labels for ``(N, D)`` crop embeddings (zero rows: too small to score).

    An instance whose best label is below ``min_similarity`` (or that was not scored) gets
    ``default_label``, or is dropped when there is none.
    """
    labels, sims = zero_shot(mask_embeddings, phrase_embeddings, phrases.owner, len(phrases.labels))
    placed = mask_embeddings.any(axis=1) & (sims >= min_similarity)
    chosen = tuple(phrases.labels[int(lab)] if ok else default_label for lab, ok in zip(labels, placed))
    keep = placed | (default_label is not None)
    return LabelChoice(chosen, np.asarray(keep, dtype=bool).reshape(len(chosen)))
