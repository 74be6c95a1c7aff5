r"""Closed-form hypergradients to test differentiable optimizers and inner loops against.

Quadratic inner problem with SGD and heavy-ball momentum (torch.optim.SGD's
convention, buffer initialised with the first gradient). With
:math:`f(w) = \tfrac12 w^\top A w - b^\top w` the unrolled iteration is linear in
the state :math:`s_t = (w_t, m_t)`:

.. math::
    m_t = \mu m_{t-1} + A w_{t-1} - b,\qquad w_t = w_{t-1} - \alpha m_t

so :math:`s_t = M s_{t-1} + c` with
:math:`M = \begin{pmatrix} I - \alpha A & -\alpha\mu I \\ A & \mu I\end{pmatrix}`,
:math:`c = (\alpha b, -b)`, :math:`m_0 = 0`. Derivatives with respect to α and μ
follow from the tangent recursion :math:`\dot s_t = M \dot s_{t-1} + \dot M s_{t-1} + \dot c`,
and with respect to :math:`w_0` from :math:`(M^K)_{ww}`: exact arithmetic, no autograd.

Ridge regression: :math:`w^*(\lambda, \theta) = \arg\min_w \tfrac1n\|Xw-y\|^2 +
\tfrac\lambda2\|w-\theta\|^2 = (\tfrac2n X^\top X + \lambda I)^{-1}(\tfrac2n X^\top y + \lambda\theta)`,
and the implicit-function theorem gives the hypergradients of any outer loss
exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class QuadraticHypergradients:
    final_weights: Tensor
    outer_loss: float
    wrt_initial_weights: Tensor
    wrt_lr: float
    wrt_momentum: float


def quadratic_sgd(A: Tensor, b: Tensor, w0: Tensor, lr: float, momentum: float, steps: int,
                  target: Tensor) -> QuadraticHypergradients:
    """Exact hypergradients of ``½‖w_K − target‖²`` after ``steps`` SGD(+momentum) steps on ``½wᵀAw − bᵀw``
    (whose gradient is ``½(A + Aᵀ)w − b``: a non-symmetric ``A`` counts through its symmetric part)."""
    A, b, w0, target = (t.double() for t in (A, b, w0, target))
    A = 0.5 * (A + A.T)
    n = w0.numel()
    eye = torch.eye(n, dtype=torch.float64)
    zero = torch.zeros(n, n, dtype=torch.float64)
    M = torch.cat([torch.cat([eye - lr * A, -lr * momentum * eye], 1), torch.cat([A, momentum * eye], 1)], 0)
    c = torch.cat([lr * b, -b])
    dM_lr = torch.cat([torch.cat([-A, -momentum * eye], 1), torch.cat([zero, zero], 1)], 0)
    dc_lr = torch.cat([b, torch.zeros(n, dtype=torch.float64)])
    dM_mu = torch.cat([torch.cat([zero, -lr * eye], 1), torch.cat([zero, eye], 1)], 0)
    s = torch.cat([w0, torch.zeros(n, dtype=torch.float64)])
    ds_lr = torch.zeros(2 * n, dtype=torch.float64)
    ds_mu = torch.zeros(2 * n, dtype=torch.float64)
    power = torch.eye(2 * n, dtype=torch.float64)
    for _ in range(steps):
        ds_lr = M @ ds_lr + dM_lr @ s + dc_lr
        ds_mu = M @ ds_mu + dM_mu @ s
        s = M @ s + c
        power = M @ power
    w = s[:n]
    residual = w - target
    return QuadraticHypergradients(
        final_weights=w,
        outer_loss=float(0.5 * residual @ residual),
        wrt_initial_weights=power[:n, :n].T @ residual,
        wrt_lr=float(residual @ ds_lr[:n]),
        wrt_momentum=float(residual @ ds_mu[:n]),
    )


@dataclass
class RidgeHypergradients:
    solution: Tensor
    outer_loss: float
    wrt_regularization: float
    wrt_center: Tensor


def ridge(X: Tensor, y: Tensor, X_val: Tensor, y_val: Tensor, regularization: float,
          center: Tensor | None = None) -> RidgeHypergradients:
    """Exact implicit hypergradients of the validation MSE at the ridge solution.

    Inner: ``mean((Xw − y)²) + (λ/2)‖w − center‖²`` (center 0 by default);
    outer: ``mean((X_val w* − y_val)²)``. Returns dL/dλ and dL/dcenter.
    """
    X, y, X_val, y_val = (t.double() for t in (X, y, X_val, y_val))
    n, d = X.shape
    center = torch.zeros(d, dtype=torch.float64) if center is None else center.double().reshape(d)
    y, y_val = y.reshape(-1), y_val.reshape(-1)
    H = 2.0 / n * X.T @ X + regularization * torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve(H, 2.0 / n * X.T @ y + regularization * center)
    residual = X_val @ w - y_val
    outer_grad = 2.0 / X_val.shape[0] * X_val.T @ residual
    v = torch.linalg.solve(H, outer_grad)  # H symmetric
    return RidgeHypergradients(
        solution=w,
        outer_loss=float((residual ** 2).mean()),
        wrt_regularization=float(-v @ (w - center)),
        wrt_center=regularization * v,
    )
