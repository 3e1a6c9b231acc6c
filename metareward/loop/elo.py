"""Judgements ranked by the meta-judge's verdicts: position-debiased battle matrices and their Bradley-Terry
Elo fit (Wu et al., 2024, "Meta-Rewarding Language Models").

With W1 (W2) the verdicts won by the first (second) position over the iteration, a first-position win
weighs w1 = W2 / (W1 + W2) and a second-position win w2 = W1 / (W1 + W2); B[m][n] adds them up, and the
Elo fit maximises sum B[m][n] log sigmoid(eps_m - eps_n) with a small L2 term that keeps it finite.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def position_wins(meta_judgements: list[dict]) -> tuple[int, int]:
    """(W1, W2): verdicts won by the first resp. second position."""
    winners = [m.get("winner") for m in meta_judgements]
    return winners.count("first"), winners.count("second")


def positional_weights(meta_judgements: list[dict]) -> tuple[float, float]:
    """(w1, w2) = (W2, W1) / (W1 + W2): a win from the favoured position counts for less.

    Returns (0.0, 0.0) when there are no verdicts at all.
    """
    first, second = position_wins(meta_judgements)
    if first + second == 0:
        return 0.0, 0.0
    return second / (first + second), first / (first + second)


def consistent_battle_matrix(judgement_ids: list[str], meta_judgements: list[dict]) -> np.ndarray:
    """B[m][n] = 1 when every verdict on m and n, in both orders (each shown at least once), named m.

    Rows naming a judgement outside ``judgement_ids`` or comparing one with itself are ignored."""
    index = {jid: i for i, jid in enumerate(judgement_ids)}
    size = len(judgement_ids)
    winners: dict[tuple[int, int], set] = defaultdict(set)
    for row in meta_judgements:
        a, b = index.get(row["first_id"]), index.get(row["second_id"])
        if a is None or b is None or a == b:
            continue
        winner = {"first": a, "second": b}.get(row.get("winner"))
        winners[(a, b)].add(winner)  # None: a verdict that names no winner
    battles = np.zeros((size, size))
    for (a, b), named in winners.items():
        if a < b and (b, a) in winners:
            both = named | winners[(b, a)]
            if len(both) == 1 and None not in both:
                winner = both.pop()
                battles[winner, b if winner == a else a] = 1.0
    return battles


def battle_matrix(judgement_ids: list[str], meta_judgements: list[dict], w1: float, w2: float) -> np.ndarray:
    """B[m][n]: weighted wins of judgement m over judgement n (indices into ``judgement_ids``).

    A first-position win adds w1, a second-position win adds w2. Rows naming a judgement
    outside ``judgement_ids``, comparing one with itself, or without a winner are ignored.
    """
    index = {jid: i for i, jid in enumerate(judgement_ids)}
    size = len(judgement_ids)
    # Integer counts first: exact, so B does not depend on the order of the rows.
    first_wins = np.zeros((size, size))
    second_wins = np.zeros((size, size))
    for row in meta_judgements:
        a, b = index.get(row["first_id"]), index.get(row["second_id"])
        if a is None or b is None or a == b:
            continue
        if row.get("winner") == "first":
            first_wins[a, b] += 1
        elif row.get("winner") == "second":
            second_wins[b, a] += 1
    return w1 * first_wins + w2 * second_wins


def _elo_objective(battles: np.ndarray, eps: np.ndarray, l2: float) -> float:
    diff = eps[:, None] - eps[None, :]
    # log sigmoid(d) = -log(1 + e^-d), written stably.
    return float(-np.sum(battles * np.logaddexp(0.0, -diff)) - 0.5 * l2 * eps @ eps)


def fit_elo(battles: np.ndarray, l2: float = 0.01) -> np.ndarray:
    """Bradley-Terry Elo: argmax sum B[m][n] log sigmoid(eps_m - eps_n) - (l2/2) |eps|^2.

    The objective is strictly concave for l2 > 0; Newton's method with a backtracking
    line search reaches the optimum to near machine precision in a few steps.
    """
    if l2 <= 0:
        raise ValueError(f"l2={l2!r}: must be > 0")
    battles = np.asarray(battles, dtype=float)
    size = battles.shape[0]
    eps = np.zeros(size)
    grad_tol = 1e-12 * (1.0 + battles.sum())
    for _ in range(100):
        diff = eps[:, None] - eps[None, :]
        p_lose = np.exp(-np.logaddexp(0.0, diff))  # sigmoid(-d) = d/dd log sigmoid(d)
        flow = battles * p_lose
        grad = flow.sum(axis=1) - flow.sum(axis=0) - l2 * eps
        if np.max(np.abs(grad), initial=0.0) < grad_tol:
            break
        curv = battles * p_lose * (1.0 - p_lose)
        sym = curv + curv.T
        neg_hessian = np.diag(sym.sum(axis=1)) - sym + l2 * np.eye(size)
        step = np.linalg.solve(neg_hessian, grad)
        start, slope, t = _elo_objective(battles, eps, l2), grad @ step, 1.0
        # Armijo backtracking; the slack absorbs rounding in the objective near the optimum,
        # where full Newton steps are right but the gain is below float resolution.
        slack = 1e-13 * (1.0 + abs(start))
        while _elo_objective(battles, eps + t * step, l2) < start + 1e-4 * t * slope - slack and t > 1e-10:
            t *= 0.5
        eps = eps + t * step
        if np.max(np.abs(t * step)) < 1e-15 * (1.0 + np.max(np.abs(eps))):
            break
    return eps
