"""Binary logistic regression with scikit-learn's L2 objective, without scikit-learn (an optional extra).

Used where oodguard learns a few weights from two classes of rows: the failure monitor (failures versus successes)
and the Mahalanobis ensemble's layer weights (ID versus OOD validation rows).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

__all__ = ["fit_logistic"]


def _objective(design: np.ndarray, y: np.ndarray, theta: np.ndarray, penalty: np.ndarray) -> float:
    z = design @ theta
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * theta**2))


def fit_logistic(
    x: np.ndarray, y: np.ndarray, c: float = 1.0, *, max_iter: int = 100, tol: float = 1e-12
) -> tuple[np.ndarray, float, int]:
    """Binary logistic regression by damped Newton steps: ``(coef [F], intercept, iterations)``.

    Minimises ``sum_i log(1 + exp(z_i)) - y_i z_i + ||coef||^2 / (2 c)`` with ``z = x @ coef + intercept``: the
    objective of scikit-learn's ``LogisticRegression(C=c)`` (L2 penalty, intercept not penalised). Strictly convex
    (the penalty keeps it so even on separable data), so Newton's method with backtracking converges to the unique
    minimum; a handful of iterations for a few features.
    """
    n, f = x.shape
    design = np.concatenate([x, np.ones((n, 1))], axis=1)
    penalty = np.full(f + 1, 1.0 / c)
    penalty[-1] = 0.0
    theta = np.zeros(f + 1)
    rate = float(np.mean(y))
    theta[-1] = math.log(rate / (1.0 - rate))  # the minimum when no feature helps
    value = _objective(design, y, theta, penalty)
    for iteration in range(1, max_iter + 1):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        gradient = design.T @ (p - y) + penalty * theta
        hessian = (design * (p * (1.0 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.lstsq(hessian, gradient, rcond=None)[0]
        decrement = float(gradient @ step)  # the Newton decrement squared: twice the predicted decrease
        if decrement / 2.0 <= tol * max(1.0, abs(value)):
            return theta[:-1].copy(), float(theta[-1]), iteration
        size = 1.0
        while True:  # Armijo backtracking: Newton steps overshoot where the data are (nearly) separable
            candidate = theta - size * step
            new_value = _objective(design, y, candidate, penalty)
            if new_value <= value - 1e-4 * size * decrement or size < 1e-10:
                break
            size /= 2.0
        theta, value = candidate, new_value
    warnings.warn(f"fit_logistic: not converged after {max_iter} Newton iterations", stacklevel=2)
    return theta[:-1].copy(), float(theta[-1]), max_iter
