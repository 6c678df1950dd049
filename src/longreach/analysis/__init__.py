"""Attention-map analyses: attention rollout and Lookback Lens ratios with their linear detector.

    from longreach.analysis import rollout, lookback_ratios, fit_detector
    r = rollout(model, input_ids)                      # pooled rollout matrix and the last token's row
    run = lookback_ratios(model, input_ids, 16)        # per generated token, per (layer, head)
    detector, report = fit_detector(features, labels, folds=5)  # logistic regression: held-back and
                                                                # cross-validated accuracy, AUROC

Both read the model's real attention through the runtime's observer (docs/analyses.md).
"""

from .logistic import (
    CrossValidation,
    FitReport,
    LogisticDetector,
    auroc,
    cross_validate,
    fit_detector,
    split_indices,
    stratified_folds,
)
from .lookback import LookbackRun, lookback_ratio, lookback_ratios, span_features
from .rollout import MAX_TOKENS, Rollout, attention_rollout, pool_columns, pool_rows, rollout

__all__ = ["MAX_TOKENS", "CrossValidation", "FitReport", "LogisticDetector", "LookbackRun", "Rollout",
           "attention_rollout", "auroc", "cross_validate", "fit_detector", "lookback_ratio", "lookback_ratios",
           "pool_columns", "pool_rows", "rollout", "span_features", "split_indices", "stratified_folds"]
