"""Independent float64 references written directly from the formulas of DESIGN §1.1,
with explicit loops (no shared code with negbench.objective)."""

from __future__ import annotations

import numpy as np


def gcl_numpy(views: np.ndarray, beta: float) -> float:
    """F = 1/(N m) Σ_{i,a} [ -β/(m-1) Σ_{b≠a} <e_ia,e_ib> + log Σ_{j≠i,c} exp(β <e_ia,e_jc>) ]."""
    n, m, _ = views.shape
    total = 0.0
    for i in range(n):
        for a in range(m):
            e = views[i, a]
            pos = sum(float(e @ views[i, b]) for b in range(m) if b != a)
            negs = [beta * float(e @ views[j, c]) for j in range(n) if j != i for c in range(m)]
            top = max(negs)
            lse = top + np.log(np.sum(np.exp(np.array(negs) - top)))
            total += -beta / (m - 1) * pos + lse
    return total / (n * m)


def gcl_grad_numpy(views: np.ndarray, beta: float) -> np.ndarray:
    """∂F/∂e for every view: each anchor's term differentiated by hand, accumulated."""
    n, m, d = views.shape
    grad = np.zeros_like(views, dtype=np.float64)
    for i in range(n):
        for a in range(m):
            e = views[i, a]
            for b in range(m):
                if b != a:  # -β/(m-1) <e_ia, e_ib>
                    grad[i, a] += -beta / (m - 1) * views[i, b]
                    grad[i, b] += -beta / (m - 1) * e
            keys = [(j, c) for j in range(n) if j != i for c in range(m)]
            logits = np.array([beta * float(e @ views[j, c]) for j, c in keys])
            p = np.exp(logits - logits.max())
            p /= p.sum()
            for (j, c), pk in zip(keys, p):
                grad[i, a] += beta * pk * views[j, c]
                grad[j, c] += beta * pk * e
    return grad / (n * m)


def nt_xent_reference(z: "torch.Tensor", beta: float) -> "torch.Tensor":  # noqa: F821
    """SimCLR's NT-Xent as usually written: z = [z_1..z_2B] with pairs (2k, 2k+1); logits are
    β·cos over every other sample (self excluded), cross-entropy on the partner."""
    import torch

    num = z.shape[0]
    logits = beta * z @ z.T
    logits = logits.masked_fill(torch.eye(num, dtype=torch.bool), float("-inf"))
    targets = torch.arange(num) ^ 1
    return torch.nn.functional.cross_entropy(logits, targets)


def numerical_gradient(loss, z: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of ``loss`` at ``z`` (float64), entry by entry."""
    grad = np.zeros_like(z)
    for index in np.ndindex(*z.shape):
        up, down = z.copy(), z.copy()
        up[index] += h
        down[index] -= h
        grad[index] = (loss(up) - loss(down)) / (2 * h)
    return grad
