"""Classification figures for a matcher on labelled pairs, the same pairs swapped, and ranked per query."""
from __future__ import annotations

import csv
import time
from collections import Counter, defaultdict
from typing import Callable, Sequence

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


def ranking_report(pairs: Sequence[LabelledPair], similarities: Sequence[float]) -> dict:
    """The pairs as a search ranks them: each query (``address1``) with candidates of more than one label,
    its candidates ordered by similarity. ``top1``: the share of queries whose first candidate has the
    best label among them (exact over partial over not); ``mrr``: the mean of 1 / the rank of the first
    candidate with that label. Ties in similarity count against the model (the worst order is taken)."""
    candidates = defaultdict(list)
    for pair, similarity in zip(pairs, similarities):
        candidates[pair.address1].append((similarity, pair.label))
    reciprocal_ranks = []
    for ranked in candidates.values():
        best = max(label for _, label in ranked)
        if all(label == best for _, label in ranked):
            continue  # nothing to rank: every order is right
        ranked.sort(key=lambda c: (-c[0], c[1] == best))
        reciprocal_ranks.append(1 / next(rank for rank, (_, label) in enumerate(ranked, 1) if label == best))
    n = len(reciprocal_ranks)
    return {"queries": n, "top1": round(sum(r == 1 for r in reciprocal_ranks) / n, 4) if n else None,
            "mrr": round(sum(reciprocal_ranks) / n, 4) if n else None}


def write_predictions(path: str, pairs: Sequence[LabelledPair], predictions) -> None:
    """Every pair's answer beside its input and truth, one TSV row each, in input order, for review."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        rows = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_NONE, escapechar="\\")
        rows.writerow(["address1", "address2", "truth", "label", "similarity", *LABELS, "kind"])
        for pair, prediction in zip(pairs, predictions):
            rows.writerow([pair.address1, pair.address2, LABELS[pair.label], prediction.label, prediction.similarity,
                           *(prediction.scores[label] for label in LABELS), pair.kind])


def evaluate(matcher, pairs: Sequence[LabelledPair], predictions_file: str | None = None,
             on_forward: Callable[[int, float], None] | None = None) -> dict:
    """Run the matcher over the pairs and report figures plus throughput (of this first pass), the share
    of pairs labelled the same with their addresses swapped (a second pass), and ``ranking_report``; with
    ``predictions_file``, every pair's answer too (``write_predictions``); ``on_forward`` hears of each
    forward of both passes (a progress bar)."""
    started = time.perf_counter()
    predictions = matcher.predict([(p.address1, p.address2) for p in pairs], on_forward)
    seconds = time.perf_counter() - started
    if predictions_file:
        write_predictions(predictions_file, pairs, predictions)
    # The same pairs with the addresses swapped: an answer should not depend on which came first.
    swapped = matcher.predict([(p.address2, p.address1) for p in pairs], on_forward)
    predicted = [LABELS.index(pr.label) for pr in predictions]
    report = classification_report([p.label for p in pairs], predicted)
    report["order_agreement"] = round(sum(a.label == b.label for a, b in zip(predictions, swapped)) / len(pairs), 4) \
        if pairs else None
    report["ranking"] = ranking_report(pairs, [pr.similarity for pr in predictions])
    total, right = Counter(), Counter()
    for pair, label in zip(pairs, predicted):
        if pair.kind:
            total[pair.kind] += 1
            right[pair.kind] += label == pair.label
    if total:
        report["by_kind"] = {kind: {"pairs": total[kind], "accuracy": round(right[kind] / total[kind], 4)}
                             for kind in sorted(total)}
    report.update({
        "pairs": len(pairs),
        "seconds": round(seconds, 3),
        "pairs_per_second": round(len(pairs) / seconds, 1) if seconds else None,
        "model": matcher.model_id,
        "load_seconds": round(matcher.load_seconds, 3),
        "max_length": matcher.max_length,
        "batch_size": matcher.batch_size,
        "backend": matcher.backend,
        "precision": matcher.precision,
        "note": matcher.note,
    })
    return report
