"""GLUE metrics in numpy, and each task's score (M2_SPEC 4).

MNLI: mean of matched and mismatched accuracy; QQP: mean of accuracy and F1; MRPC: F1; CoLA:
Matthews correlation; STS-B: Spearman correlation; QNLI, SST-2, RTE and the text task: accuracy.
F1 is of the positive class 1. Scores are fractions here; the results table shows them x 100.
"""

from __future__ import annotations

import numpy as np


def _check(predictions: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape or predictions.ndim != 1 or predictions.size == 0:
        raise ValueError(
            f"expected two non-empty 1-D arrays of one length, got shapes {predictions.shape} and {targets.shape}"
        )
    return predictions, targets


def accuracy(predictions: np.ndarray, targets: np.ndarray) -> float:
    predictions, targets = _check(predictions, targets)
    return float(np.mean(predictions == targets))


def binary_f1(predictions: np.ndarray, targets: np.ndarray) -> float:
    """F1 of class 1: 2 TP / (2 TP + FP + FN); 0 when there is no positive at all."""
    predictions, targets = _check(predictions, targets)
    tp = float(np.sum((predictions == 1) & (targets == 1)))
    fp = float(np.sum((predictions == 1) & (targets != 1)))
    fn = float(np.sum((predictions != 1) & (targets == 1)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Binary MCC: (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)); 0 when a margin is empty."""
    predictions, targets = _check(predictions, targets)
    p, t = predictions == 1, targets == 1
    tp, tn = float(np.sum(p & t)), float(np.sum(~p & ~t))
    fp, fn = float(np.sum(p & ~t)), float(np.sum(~p & t))
    denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / float(np.sqrt(denominator)) if denominator else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either input is constant."""
    x, y = _check(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    x, y = x - x.mean(), y - y.mean()
    denominator = float(np.sqrt(np.sum(x * x) * np.sum(y * y)))
    return float(np.sum(x * y)) / denominator if denominator else 0.0


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (scipy.stats.rankdata's "average")."""
    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Runs of equal values: each gets the mean of the positions it spans.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    average = (starts + ends + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation: Pearson on average ranks."""
    x, y = _check(np.asarray(x), np.asarray(y))
    return pearson(rankdata(x), rankdata(y))


# The task's score (what the GLUE average uses) and the name it is shown under.
SCORE_NAMES = {
    "mnli": "acc (m/mm mean)",
    "qnli": "acc",
    "qqp": "acc/F1 mean",
    "sst2": "acc",
    "cola": "MCC",
    "mrpc": "F1",
    "stsb": "Spearman",
    "rte": "acc",
}


def split_metrics(task: str, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Metrics of one dev split from the model outputs: (N, C) logits, or (N,) / (N, 1) scores."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if task == "stsb":
        scores = outputs.reshape(len(outputs))
        return {"spearman": spearman(scores, targets), "pearson": pearson(scores, targets)}
    predictions = outputs.argmax(axis=-1)
    metrics = {"accuracy": accuracy(predictions, targets)}
    if task in ("qqp", "mrpc"):
        metrics["f1"] = binary_f1(predictions, targets)
    if task == "cola":
        metrics["mcc"] = matthews_corrcoef(predictions, targets)
    return metrics


def task_score(task: str, metrics: dict[str, dict[str, float]]) -> float:
    """The task's GLUE score from its per-split metrics (`{"dev": {...}}`, MNLI's two dev splits)."""
    if task == "mnli":
        return (metrics["dev_matched"]["accuracy"] + metrics["dev_mismatched"]["accuracy"]) / 2
    dev = metrics["dev"]
    if task == "qqp":
        return (dev["accuracy"] + dev["f1"]) / 2
    if task == "mrpc":
        return dev["f1"]
    if task == "cola":
        return dev["mcc"]
    if task == "stsb":
        return dev["spearman"]
    return dev["accuracy"]
