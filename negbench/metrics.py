"""Representation metrics: alignment and uniformity (Wang & Isola, 2020), the linear probe and
k-NN accuracy, and the process's peak memory."""

from __future__ import annotations

import contextlib
import math
import resource
import sys

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from negbench.contract import check_range

#: The fixed evaluation protocol, recorded in every config.json. Never tuned on the test split.
PROBE_PROTOCOL = {
    "features": "frozen encoder features (the layer before the projection head), clean inputs",
    "linear_probe": "StandardScaler + LogisticRegression(C=1.0, lbfgs, max_iter=1000) on the train split",
    "knn": "k-NN with k = 1 and 10, cosine distance, uniform votes, on the train split",
    "score": "accuracy on the test split",
}


def alignment(views: Tensor) -> float:
    """Mean ‖e_ia − e_ib‖² over the positive pairs (a ≠ b) of (N, m, d) embeddings."""
    n, m, _ = views.shape
    diffs = views[:, :, None, :] - views[:, None, :, :]
    sq = diffs.pow(2).sum(-1)
    value = float(sq.sum() / (n * m * (m - 1)))
    check_range("alignment", value)  # in [0, 4] for unit vectors
    return value


def uniformity(views: Tensor, chunk_size: int = 2048) -> float:
    """log mean exp(−2‖e − e'‖²) over pairs of views of different items, in chunks."""
    n, m, d = views.shape
    flat = views.reshape(n * m, d).double()
    item = torch.arange(n, device=views.device).repeat_interleave(m)
    total = torch.tensor(float("-inf"), dtype=torch.float64, device=views.device)
    for start in range(0, n * m, chunk_size):
        sq = (2.0 - 2.0 * flat[start : start + chunk_size] @ flat.T).clamp_min(0.0)
        logits = (-2.0 * sq).masked_fill(item[start : start + chunk_size, None] == item[None, :], float("-inf"))
        total = torch.logaddexp(total, logits.logsumexp(dim=(0, 1)))
    num_pairs = n * m * (n - 1) * m
    value = float(total) - math.log(num_pairs)
    check_range("uniformity", value)  # log of a mean of numbers <= 1
    return value


def probe_accuracies(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor
) -> dict[str, float]:
    """``lp_acc``, ``knn1_acc``, ``knn10_acc`` under :data:`PROBE_PROTOCOL`."""
    x_train = train_features.double().cpu().numpy()
    x_test = test_features.double().cpu().numpy()
    y_train = train_labels.cpu().numpy()
    y_test = test_labels.cpu().numpy()
    scores: dict[str, float] = {}
    if len(np.unique(y_train)) > 1:
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
        probe.fit(x_train, y_train)
        scores["lp_acc"] = float(probe.score(x_test, y_test))
    else:
        scores["lp_acc"] = float(np.mean(y_test == y_train[0]))
    for k in (1, 10):
        knn = KNeighborsClassifier(n_neighbors=min(k, len(y_train)), metric="cosine")
        knn.fit(x_train, y_train)
        scores[f"knn{k}_acc"] = float(knn.score(x_test, y_test))
    for name, value in scores.items():
        check_range(name, value)
    return scores


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA ``max_memory_allocated`` on a GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh :func:`peak_memory_bytes` window, so that several runs in one process
    (``negbench compare``) each report their own peak: ``reset_peak_memory_stats`` on a GPU;
    on Linux CPUs, writing 5 to ``/proc/self/clear_refs`` resets the peak resident set size
    (``ru_maxrss`` then restarts from the current size). Elsewhere the CPU peak stays the
    process's lifetime peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
