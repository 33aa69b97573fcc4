"""Classification figures for a matcher on labelled pairs."""
from __future__ import annotations

import time
from typing import Sequence

from .checkpoint import LABELS
from .dataset import LabelledPair


def classification_report(truth: Sequence[int], predicted: Sequence[int]) -> dict:
    """Macro-F1, accuracy, per-label precision/recall/F1 and the confusion matrix (rows: truth)."""
    n = len(LABELS)
    confusion = [[0] * n for _ in range(n)]
    for t, p in zip(truth, predicted):
        confusion[t][p] += 1
    per_label = {}
    for i, label in enumerate(LABELS):
        tp = confusion[i][i]
        predicted_i = sum(confusion[r][i] for r in range(n))
        actual_i = sum(confusion[i])
        precision = tp / predicted_i if predicted_i else 0.0
        recall = tp / actual_i if actual_i else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": round(precision, 4), "recall": round(recall, 4),
                            "f1": round(f1, 4), "support": actual_i}
    total = len(truth)
    return {
        "macro_f1": round(sum(v["f1"] for v in per_label.values()) / n, 4),
        "accuracy": round(sum(confusion[i][i] for i in range(n)) / total, 4) if total else 0.0,
        "per_label": per_label,
        "confusion": {"labels": list(LABELS), "rows_truth_columns_predicted": confusion},
    }


def evaluate(matcher, pairs: Sequence[LabelledPair]) -> dict:
    """Run the matcher over the pairs and report figures plus throughput."""
    started = time.perf_counter()
    predictions = matcher.predict([(p.address1, p.address2) for p in pairs])
    seconds = time.perf_counter() - started
    report = classification_report([p.label for p in pairs],
                                   [LABELS.index(pr.label) for pr in predictions])
    kinds = sorted({p.kind for p in pairs if p.kind})
    if kinds:
        right = [LABELS.index(pr.label) == p.label for p, pr in zip(pairs, predictions)]
        report["by_kind"] = {kind: {"pairs": sum(1 for p in pairs if p.kind == kind),
                                    "accuracy": round(sum(r for p, r in zip(pairs, right) if p.kind == kind)
                                                      / sum(1 for p in pairs if p.kind == kind), 4)}
                             for kind in kinds}
    report.update({
        "pairs": len(pairs),
        "seconds": round(seconds, 3),
        "pairs_per_second": round(len(pairs) / seconds, 1) if seconds else None,
        "model": matcher.model_id,
        "load_seconds": round(matcher.load_seconds, 3),
        "max_length": matcher.max_length,
        "batch_size": matcher.batch_size,
    })
    return report
