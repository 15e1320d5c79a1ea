"""Labels learned from a project's annotations: CLIP prototypes plus a mask-geometry model.

Each annotated region becomes one *example*: its label, the ``(D,)`` unit CLIP embedding of its
crop and the ``(G,)`` mask-geometry descriptor (``geometry``) of its mask (the cached instance mask
it matches, or the region's own mask). Per label, the prototype is the normalised mean of its
examples' embeddings (measured as good as a linear probe on the fixture CLIP, docs/learned-labels.md, *Labels
learned from annotations*, and no training step: any replica rebuilds it in microseconds).

A crop embedding may say little about an object's outline (the fixture CLIP encodes colour), so
the examples also fit a Gaussian model of their geometry (``GeometryModel``): features standardised
by the examples' own statistics, one centroid per label, a within-label covariance shrunk towards
its diagonal and towards unit variance (few examples). How much it counts beside CLIP is the
project's own: the blend weight of best leave-one-out accuracy on its examples, 0 (CLIP only) on
ties, and no geometry at all while some learned label has fewer than 2 examples with geometry.

A label is *learned* once it has ``min_examples`` examples. Whether learned labels are used at all
is decided per tag by ``decision.decide`` (leave-one-out on the examples against zero-shot); where
they are, they only *refine* zero-shot (``refine_zero_shot``): an instance zero-shot placed on a
learned label gets the learned label of best score among the learned ones, every other instance keeps
zero-shot's label and every instance zero-shot's keep. So the mixed regime (some labels learned,
some not) moves no instance between the learned and the unlearned labels, and learning drops none.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastsam_backend.core.geometry import GEOMETRY_VERSION, N_FEATURES
from fastsam_backend.labels.zero_shot import LabelChoice

# Chosen on development seeds (example scenes, ``quality-labels --dev``), never the evaluated ones.
# Issue 24 (the by-tasks curve, development seeds): no diagonal shrinkage and a lighter prior, since
# projects label every object of a task (dozens of examples soon); on the by-examples development
# curve this was as good (0.789 / 0.885 / 0.920 at 3 / 10 / 30 a label against 0.786 / 0.891 / 0.904).
DIAGONAL_SHRINK = 0.0  # covariance = (1 - s) pooled + s diag(pooled)
PRIOR_DOF = 0.25  # per label, pseudo-examples of unit variance mixed into the pooled covariance: keeps it invertible
BLEND_WEIGHTS = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)  # geometry score's weight; 0 first (ties)
MIN_GEOMETRY_EXAMPLES = 2  # per learned label: leave-one-out needs another example of the label

@dataclass(frozen=True)
class Example:
    """One annotated region: ``label``, its ``(D,)`` float32 unit CLIP crop embedding and its
    ``(G,)`` float32 mask-geometry descriptor (None: an example stored before geometry existed)."""

    label: str
    embedding: np.ndarray
    geometry: np.ndarray | None = None


@dataclass(frozen=True)
class GeometryModel:
    """A Gaussian over standardised geometry descriptors, one centroid per label.

    Attributes:
        mean, scale: ``(G,)`` float32, the examples' feature mean and std (``z = (g - mean) / scale``).
        centroids: ``(L, G)`` float32 per label of the model (rows of unlearned labels unused).
        precision: ``(G, G)`` float32 inverse of the shrunk within-label covariance.
        weight: the geometry score's weight beside the CLIP score (leave-one-out, > 0).
    """

    mean: np.ndarray
    scale: np.ndarray
    centroids: np.ndarray
    precision: np.ndarray
    weight: float

    def scores(self, geometry: np.ndarray) -> np.ndarray:
        """``(N, L)``: minus half the squared Mahalanobis distance, per feature, of each ``(N, G)``
        descriptor to each label's centroid (a log-likelihood up to a constant)."""
        z = (np.asarray(geometry, np.float32) - self.mean) / self.scale
        d = z[:, None, :] - self.centroids[None]
        return -0.5 * np.einsum("nlj,jk,nlk->nl", d, self.precision, d) / z.shape[1]


@dataclass(frozen=True)
class LabelModel:
    """Prototypes of one project.

    Attributes:
        labels: ``(L,)`` label names, sorted.
        prototypes: ``(L, D)`` float32 unit vectors, row ``i`` for ``labels[i]``.
        counts: ``(L,)`` int examples per label.
        revision: the project's example-store revision these were built from.
        min_examples: a label with fewer examples is not used (zero-shot decides it).
        geometry: the geometry model, None while it cannot be fitted or CLIP alone did as well.
        examples: the examples it was fitted from (``decision`` scores them leave-one-out).
        decisions: memo of ``decision.decide`` per tag (labels and phrases), filled by the service.
    """

    labels: tuple[str, ...]
    prototypes: np.ndarray
    counts: np.ndarray
    revision: int
    min_examples: int
    geometry: GeometryModel | None = None
    examples: tuple[Example, ...] = field(default=(), compare=False, repr=False)
    decisions: dict[Any, Any] = field(default_factory=dict, compare=False, repr=False)

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
        """Prototypes and the geometry model from examples (rows that are all zero, i.e. unscored
        crops, are skipped). A function of the stored examples alone, so every replica builds the
        same model (and ``version_tag``) for a revision."""
        kept = [ex for ex in examples if np.asarray(ex.embedding).any()]
        if not kept:
            return cls.empty(min_examples, revision)
        labels = tuple(sorted({ex.label for ex in kept}))
        emb = np.stack([np.asarray(ex.embedding, np.float32).reshape(-1) for ex in kept])
        y = np.array([labels.index(ex.label) for ex in kept], np.int64)
        sums = np.stack([emb[y == i].sum(axis=0) for i in range(len(labels))])
        protos = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        counts = np.bincount(y, minlength=len(labels)).astype(np.int64)
        model = cls(labels, protos.astype(np.float32), counts, revision, min_examples)
        geo = _fit_geometry(model, kept, emb, y, sums)
        return cls(labels, model.prototypes, counts, revision, min_examples, geo, tuple(kept))

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
        geo = None if self.geometry is None else (GEOMETRY_VERSION, round(self.geometry.weight, 3))
        canon = repr((self.revision, [(lab, self.count(lab)) for lab in used], geo)).encode()
        return f"L{self.revision}.{hashlib.sha256(canon).hexdigest()[:6]}"

    def similarities(self, embeddings: np.ndarray, labels: tuple[str, ...]) -> np.ndarray:
        """``(N, len(labels))`` cosine of each ``(N, D)`` embedding to each label's prototype."""
        rows = [self.labels.index(lab) for lab in labels]
        return embeddings.astype(np.float32) @ self.prototypes[rows].T

    def geometry_scores(self, geometry: np.ndarray | None, labels: tuple[str, ...]) -> np.ndarray | None:
        """``(N, len(labels))`` weighted geometry scores of ``(N, G)`` descriptors (None: not used)."""
        if self.geometry is None or geometry is None:
            return None
        rows = [self.labels.index(lab) for lab in labels]
        return self.geometry.weight * self.geometry.scores(geometry)[:, rows]


def _fit_geometry(model: LabelModel, examples: list[Example], emb: np.ndarray, y: np.ndarray,
                  sums: np.ndarray) -> GeometryModel | None:
    """The geometry model over the learned labels' examples that have a descriptor, with its
    leave-one-out blend weight; None when it cannot be fitted or does not beat CLIP alone."""
    learned = [i for i, lab in enumerate(model.labels) if model.count(lab) >= model.min_examples]
    has = np.array([ex.geometry is not None and np.shape(ex.geometry) == (N_FEATURES,) for ex in examples])
    rows = np.flatnonzero(has & np.isin(y, learned))
    n_labels = len(model.labels)
    per_label = np.bincount(y[rows], minlength=n_labels)
    if len(learned) < 2 or (per_label[learned] < MIN_GEOMETRY_EXAMPLES).any():
        return None
    g = np.stack([np.asarray(examples[r].geometry, np.float32) for r in rows])
    yg = y[rows]
    mean, scale = g.mean(axis=0), g.std(axis=0) + 1e-3  # + 1e-3: a constant feature stays finite
    z = (g - mean) / scale
    zsum = np.stack([z[yg == i].sum(axis=0) for i in range(n_labels)])
    centroids = zsum / np.maximum(per_label, 1)[:, None]
    resid = z - centroids[yg]
    dof = max(len(yg) - len(learned), 1)
    cov = (resid.T @ resid + PRIOR_DOF * len(learned) * np.eye(z.shape[1])) / (dof + PRIOR_DOF * len(learned))
    cov = (1 - DIAGONAL_SHRINK) * cov + DIAGONAL_SHRINK * np.diag(np.diag(cov))
    precision = np.linalg.inv(cov).astype(np.float32)
    geo = GeometryModel(mean.astype(np.float32), scale.astype(np.float32), centroids.astype(np.float32),
                        precision, 1.0)
    # Leave-one-out scores of each example against the learned labels: its own label's prototype
    # and centroid without it (the covariance keeps it: a small optimism, the same for every weight).
    # As in prediction (``refine_zero_shot``), the label words' text cosine is not part of the score.
    n, cols = len(rows), np.array(learned)
    own = np.searchsorted(cols, yg)
    clip = emb[rows] @ model.prototypes[cols].T
    loo_proto = sums[yg] - emb[rows]
    loo_proto /= np.maximum(np.linalg.norm(loo_proto, axis=1, keepdims=True), 1e-12)
    clip[np.arange(n), own] = np.einsum("nd,nd->n", emb[rows], loo_proto)
    geo_s = geo.scores(g)[:, cols]
    loo_c = (zsum[yg] - z) / (per_label[yg] - 1)[:, None]
    d = z - loo_c
    geo_s[np.arange(n), own] = -0.5 * np.einsum("nj,jk,nk->n", d, precision, d) / z.shape[1]
    acc = [np.mean((clip + w * geo_s).argmax(axis=1) == own) for w in BLEND_WEIGHTS]
    weight = BLEND_WEIGHTS[int(np.argmax(acc))]  # the first best: CLIP alone wins ties
    if weight == 0:
        return None
    return GeometryModel(geo.mean, geo.scale, geo.centroids, geo.precision, float(weight))


def label_scores(embeddings: np.ndarray, phrase_embeddings: np.ndarray, owner: np.ndarray,
                 n_labels: int) -> np.ndarray:
    """``(N, n_labels)`` zero-shot cosine of each instance to each label (its best phrase)."""
    sims = embeddings.astype(np.float32) @ phrase_embeddings.astype(np.float32).T
    out = np.full((len(embeddings), n_labels), -1.0, np.float32)
    for label in range(n_labels):
        if (cols := owner == label).any():
            out[:, label] = sims[:, cols].max(axis=1)
    return out


def refine_zero_shot(model: LabelModel, embeddings: np.ndarray, labels: tuple[str, ...], zero_shot: LabelChoice,
                     text_scores: np.ndarray, geometry: np.ndarray | None = None) -> LabelChoice:
    """Zero-shot's choice, refined by the learned labels.

    Args:
        embeddings: ``(N, D)`` unit crop embeddings (zero rows: too small to score).
        labels: the tag's labels.
        zero_shot: the zero-shot choice among all the tag's labels (``choose_labels``).
        text_scores: ``(N, len(labels))`` zero-shot cosine of each instance to each label's words
            (``label_scores``): its argmax is zero-shot's label, telling a placed instance from a default.
        geometry: ``(N, G)`` mask-geometry descriptors (the model's geometry score is added).

    An instance zero-shot placed (its label is the text argmax, not a default) on a learned label gets
    the learned label of highest prototype cosine + weighted geometry score among the learned labels
    (the words' cosine left out: on the development curves it only hurt once labels were learned);
    every other instance keeps zero-shot's label, and ``keep`` is zero-shot's: the
    set of instances on learned labels, and the set kept, are zero-shot's.
    """
    learned = model.learned(labels)
    n = len(embeddings)
    if not learned or n == 0:
        return zero_shot
    scores = model.similarities(embeddings, learned)
    if (geo := model.geometry_scores(geometry, learned)) is not None:
        scores = scores + geo
    best = scores.argmax(axis=1)
    placed = np.asarray(text_scores).argmax(axis=1)
    scored = embeddings.any(axis=1)
    out = list(zero_shot.labels)
    for i in range(n):
        if (zero_shot.keep[i] and scored[i] and out[i] in learned and out[i] == labels[int(placed[i])]):
            out[i] = learned[int(best[i])]
    return LabelChoice(tuple(out), np.array(zero_shot.keep, dtype=bool))


def learned_label(model: LabelModel, embeddings: np.ndarray, labels: tuple[str, ...], *, min_similarity: float,
                  geometry: np.ndarray | None = None) -> tuple[str | None, ...]:
    """Per ``(N, D)`` embedding the nearest learned label (prototype cosine + weighted geometry score),
    or None where it does not place: unscored, or, while some label of the tag is not learned, a
    prototype cosine below ``min_similarity``. For a click or box whose prompt carries no label."""
    learned = model.learned(labels)
    n = len(embeddings)
    if not learned or n == 0:
        return (None,) * n
    cosine = model.similarities(embeddings, learned)
    sims = cosine
    if (geo := model.geometry_scores(geometry, learned)) is not None:
        sims = sims + geo
    best = sims.argmax(axis=1)
    ok = embeddings.any(axis=1) & ((len(learned) == len(labels)) | (cosine[np.arange(n), best] >= min_similarity))
    return tuple(learned[int(b)] if good else None for b, good in zip(best, ok))
