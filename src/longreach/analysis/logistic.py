"""A small L2-regularised logistic regression, a deterministic stratified split and stratified k-fold
cross-validation, in torch (no sklearn).

The Lookback Lens detector is a linear probe on a few hundred features (layers × heads); Newton's method on
that size is exact and converges in a handful of steps, so there is nothing to tune but the penalty. Labelled
answers are few and expensive, so besides one held-back split the fit reports k-fold cross-validation, where
every row is scored once by a detector that never saw it, and the AUROC (the paper's metric), which does not
depend on a threshold or on the class balance.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError


def split_indices(labels: Tensor | list[int], held_back: float = 0.25, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train, held-back) indices: per class, a seeded shuffle puts ``held_back`` of its rows aside.

    Stratified so both parts keep the class balance (a small labelled set can otherwise leave a class out of
    training); deterministic in ``seed``; the two parts are disjoint and together cover every row.
    """
    y = torch.as_tensor(labels).long().flatten()
    if not 0 < held_back < 1:
        raise InputError(f"held_back must be a fraction in (0, 1), got {held_back}")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in sorted(set(y.tolist())):
        rows = torch.nonzero(y == cls).flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)]
        n_test = min(len(rows) - 1, max(1, round(held_back * len(rows)))) if len(rows) > 1 else 0
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def stratified_folds(labels: Tensor | list[int], k: int = 5, seed: int = 0) -> list[Tensor]:
    """``k`` disjoint folds covering every row: per class, a seeded shuffle dealt round-robin, each class starting
    at the fold after the last one the previous class filled, so each fold keeps the class balance and the folds'
    sizes differ by at most one row."""
    y = torch.as_tensor(labels).long().flatten()
    if k < 2:
        raise InputError(f"cross-validation needs at least 2 folds, got {k}")
    gen = torch.Generator().manual_seed(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    dealt = 0
    for cls in sorted(set(y.tolist())):
        rows = torch.nonzero(y == cls).flatten()
        for row in rows[torch.randperm(len(rows), generator=gen)].tolist():
            folds[dealt % k].append(row)
            dealt += 1
    return [torch.tensor(sorted(f), dtype=torch.long) for f in folds]


def auroc(scores: Tensor | list[float], labels: Tensor | list[int]) -> float:
    """The probability that a random positive row scores above a random negative one (ties count half): the
    Mann-Whitney form of the area under the ROC curve. NaN when a class is missing."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).long().flatten()
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@dataclass
class LogisticDetector:
    """P(label = 1 | x) = sigmoid(w · (x - mean) / std + b); features are standardised with the training rows'
    statistics, which are kept with the weights so a saved detector applies to raw features."""

    weights: list[float]
    bias: float
    mean: list[float]
    std: list[float]
    meta: dict = field(default_factory=dict)

    @classmethod
    def fit(cls, x: Tensor, y: Tensor, l2: float = 1.0, steps: int = 50, tol: float = 1e-10) -> LogisticDetector:
        """Newton's method on the mean log-loss + ``l2``/(2n) · |w|² (the bias is not penalised)."""
        x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64).flatten()
        if x.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
            raise InputError(f"need features (n, d) and n labels with n >= 2, got {tuple(x.shape)} and {len(y)}")
        if not ((y == 0) | (y == 1)).all():
            raise InputError("labels must be 0 or 1")
        mean, std = x.mean(0), x.std(0, unbiased=False).clamp(min=1e-8)
        z = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # (n, d + 1)
        n, d1 = z.shape
        penalty = torch.full((d1,), l2 / n, dtype=torch.float64)
        penalty[-1] = 0.0
        theta = torch.zeros(d1, dtype=torch.float64)

        def loss(t: Tensor) -> Tensor:
            logits = z @ t
            return torch.nn.functional.softplus(logits).mean() - (y * logits).mean() + 0.5 * (penalty * t * t).sum()

        current = loss(theta)
        for _ in range(steps):
            p = torch.sigmoid(z @ theta)
            grad = z.T @ (p - y) / n + penalty * theta
            hess = (z.T * (p * (1 - p))) @ z / n + torch.diag(penalty) + 1e-10 * torch.eye(d1, dtype=torch.float64)
            step = torch.linalg.solve(hess, grad)
            scale = 1.0
            while scale > 1e-6:  # backtracking: a full Newton step can overshoot on nearly separable data
                trial = theta - scale * step
                value = loss(trial)
                if value <= current:
                    break
                scale /= 2
            done = current - value < tol
            theta, current = trial, value
            if done:
                break
        return cls(theta[:-1].tolist(), float(theta[-1]), mean.tolist(), std.tolist())

    def probability(self, x: Tensor) -> Tensor:
        """P(label = 1) per row of x (n, d), or for one feature vector (d,)."""
        x = torch.as_tensor(x, dtype=torch.float64)
        if x.shape[-1] != len(self.weights):
            raise InputError(f"this detector takes {len(self.weights)} features, got {x.shape[-1]}; was it fitted "
                             "on another model (layers × heads)?")
        w, mean, std = (torch.tensor(v, dtype=torch.float64) for v in (self.weights, self.mean, self.std))
        return torch.sigmoid(((x - mean) / std) @ w + self.bias)

    def predict(self, x: Tensor) -> Tensor:
        return (self.probability(x) >= 0.5).long()

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        y = torch.as_tensor(y).long().flatten()
        return float((self.predict(x) == y).double().mean()) if len(y) else float("nan")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LogisticDetector:
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as err:
            raise InputError(f"{path} is not a saved detector (write one with `longreach lookback fit`): {err}"
                             ) from None


@dataclass
class CrossValidation:
    """Stratified k-fold: every row scored once by the detector fitted on the other folds."""

    folds: int
    right: int  # out-of-fold predictions (P >= 0.5) that matched the label, of every row
    rows: int
    auroc: float  # of the pooled out-of-fold probabilities
    majority_accuracy: float  # each fold answered with its training rows' majority class
    probabilities: list[float]  # out-of-fold P(label = 1), row by row

    @property
    def accuracy(self) -> float:
        return self.right / self.rows


def cross_validate(x: Tensor, y: Tensor, folds: int = 5, seed: int = 0, l2: float = 1.0) -> CrossValidation:
    """Fit on k - 1 folds, score the k-th, for each fold in turn (:func:`stratified_folds`)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y).long().flatten()
    if min(int(y.sum()), int((1 - y).sum())) < folds:
        raise InputError(f"{folds}-fold cross-validation needs at least {folds} rows of each label, got "
                         f"{int((1 - y).sum())} of label 0 and {int(y.sum())} of label 1; lower --folds or build "
                         "more labelled rows")
    prob = torch.empty(len(y), dtype=torch.float64)
    majority_right = 0
    for test in stratified_folds(y, folds, seed):
        train = torch.ones(len(y), dtype=torch.bool)
        train[test] = False
        prob[test] = LogisticDetector.fit(x[train], y[train], l2).probability(x[test])
        majority_right += int((y[test] == int(y[train].double().mean() >= 0.5)).sum())
    right = int(((prob >= 0.5).long() == y).sum())
    return CrossValidation(folds, right, len(y), auroc(prob, y), majority_right / len(y), prob.tolist())


@dataclass
class FitReport:
    """How the detector did on rows it never saw, beside the trivial baseline it must beat."""

    n_train: int
    n_held_back: int
    positives_train: int
    positives_held_back: int
    train_accuracy: float
    held_back_accuracy: float
    majority_accuracy: float  # held-back accuracy of always answering the training rows' majority class
    held_back_auroc: float | None = None  # None when the held-back rows hold one label only
    cross_validation: CrossValidation | None = None  # over every row, when asked for


def fit_detector(x: Tensor, y: Tensor, held_back: float = 0.25, seed: int = 0, l2: float = 1.0, folds: int = 0
                 ) -> tuple[LogisticDetector, FitReport]:
    """Split (stratified, seeded), fit on the training part, score on the held-back part; with ``folds`` >= 2,
    also cross-validate over every row (the saved detector is still the one fitted on the training part)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y).long().flatten()
    train, test = split_indices(y, held_back, seed)
    if len(test) == 0 or len(set(y[train].tolist())) < 2:
        raise InputError(f"{len(y)} rows with labels {sorted(set(y.tolist()))}: need both labels, and at least "
                         "two rows of each, to fit a detector and hold rows back; build more labelled rows")
    cv = cross_validate(x, y, folds, seed, l2) if folds else None
    det = LogisticDetector.fit(x[train], y[train], l2)
    majority = int(y[train].double().mean() >= 0.5)
    held_auroc = auroc(det.probability(x[test]), y[test])  # NaN when one label was held back
    report = FitReport(len(train), len(test), int(y[train].sum()), int(y[test].sum()),
                       det.accuracy(x[train], y[train]), det.accuracy(x[test], y[test]),
                       float((y[test] == majority).double().mean()),
                       held_auroc if math.isfinite(held_auroc) else None, cv)
    det.meta["report"] = asdict(report)
    return det, report
