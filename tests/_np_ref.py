"""Independent NumPy reference of the LoRA-Pro algorithm (paper layout), written from the paper's
formulas without using any lorapro_jax code. Used only by the tests."""

import numpy as np


def proj(m):
    """Orthogonal projector onto the column space of m."""
    return m @ np.linalg.pinv(m)


def sylvester_kron(s1, s2, c):
    """Solves s1 X + X s2 = c through the Kronecker-product linear system (least squares)."""
    r, k = c.shape
    big = np.kron(np.eye(k), s1) + np.kron(s2.T, np.eye(r))
    return np.linalg.lstsq(big, c.reshape(-1, order="F"), rcond=None)[0].reshape(r, k, order="F")


def lora_pro_np(A, B, gA, gB, s, delta=1e-8, x_mode="sylvester"):
    r = A.shape[0]
    Q = np.linalg.pinv(B.T @ B + delta * np.eye(r))
    P = np.linalg.pinv(A @ A.T + delta * np.eye(r))
    if x_mode == "sylvester":
        X = sylvester_kron(B.T @ B, A @ A.T, -Q @ gA @ A.T / s**2)
    elif x_mode == "symmetry":
        X = -0.5 * Q @ B.T @ gB @ (A @ A.T) / s**2
    else:
        X = np.zeros((r, r))
    m = B.shape[0]
    ga = Q @ gA / s**2 + X @ A
    gb = (np.eye(m) - B @ Q @ B.T) @ gB @ P / s**2 - B @ X
    return ga, gb


def best_equivalent_gradient_lstsq(A, B, g, s):
    """min over (X_A, X_B) of ||s (B X_A + X_B A) - g||_F, brute force with vec/Kronecker lstsq."""
    m, n = g.shape
    r = A.shape[0]
    # vec (column-major) of B X_A = (I_n ⊗ B) vec(X_A); of X_B A = (Aᵀ ⊗ I_m) vec(X_B).
    big = s * np.concatenate([np.kron(np.eye(n), B), np.kron(A.T, np.eye(m))], axis=1)
    sol = np.linalg.lstsq(big, g.reshape(-1, order="F"), rcond=None)[0]
    xa = sol[: r * n].reshape(r, n, order="F")
    xb = sol[r * n :].reshape(m, r, order="F")
    return s * (B @ xa + xb @ A)


class AdamFullNP:
    """The paper's LoRA-Pro AdamW full form for one pair, NumPy, true step count t."""

    def __init__(self, m, n, b1=0.9, b2=0.999, eps=1e-8, x_mode="sylvester"):
        self.mu = np.zeros((m, n))
        self.nu = np.zeros((m, n))
        self.t = 0
        self.b1, self.b2, self.eps, self.x_mode = b1, b2, eps, x_mode

    def direction(self, A, B, gA, gB, s):
        ga0, gb0 = lora_pro_np(A, B, gA, gB, s, x_mode="zero")
        e = s * (B @ ga0 + gb0 @ A)
        self.t += 1
        self.mu = self.b1 * self.mu + (1 - self.b1) * e
        self.nu = self.b2 * self.nu + (1 - self.b2) * e**2
        d = (self.mu / (1 - self.b1**self.t)) / (np.sqrt(self.nu / (1 - self.b2**self.t)) + self.eps)
        return lora_pro_np(A, B, s * B.T @ d, s * d @ A.T, s, x_mode=self.x_mode), d
