"""The judge-alignment objectives and held-out metrics, on label distributions alone (torch, no model).

Shapes: ``log_q`` [B, K] is the model's log-distribution over each item's labels (renormalised over
them), ``target`` [B, K] the human distribution, ``mask`` [B, K] which of the K slots are labels (items
have different numbers of labels; padded slots have mask False, target 0), ``majority`` [B] the index
of the unique majority label or -1.

Objectives (``align.objective``), per item, averaged over the batch:

- ``point``: CE(majority) = -log q[majority], the single-point baseline (items without a unique
  majority carry no point label; alignment.py leaves them out of training).
- ``distribution``: KL_eps(p || q) + lambda * CE(majority), lambda = ``align.ce_weight``; the CE term
  is 0 for an item without a unique majority.

The adversarial KL, with eps = ``align.adversarial_epsilon``: a distribution estimated from a few
annotators is a noisy estimate of the true one, so the model is trained against the worst target
within total-variation distance eps of the empirical p,

    KL_eps(p || q) = max over p' (a distribution with TV(p', p) <= eps) of  CE(p', q) - H(p)

that is, the target the model pays the most cross-entropy against, with the divergence measured from
the empirical distribution's entropy. CE is linear in p', so the maximiser is exact: eps of mass (or
all there is) moves onto the label the model gives the least probability, taken from the labels it
gives the most. The maximiser is held fixed for the gradient (Danskin: the gradient of a max is the
gradient at its argmax). KL_0 = KL(p || q), and KL_eps >= KL(p || q) for every eps, since p itself is
a candidate.
"""

from __future__ import annotations

import torch


def renormalised(label_log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of each item's label tokens, renormalised over its labels (padding: -inf)."""
    masked = label_log_probs.masked_fill(~mask, float("-inf"))
    return masked - torch.logsumexp(masked, dim=-1, keepdim=True)


def _xlogy(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x * y with 0 where x is 0 (padded slots hold -inf in y)."""
    return torch.where(x > 0, x * y, torch.zeros_like(x))


def entropy(target: torch.Tensor) -> torch.Tensor:
    return -_xlogy(target, torch.log(target.clamp_min(1e-30))).sum(-1)


def cross_entropy(target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return -_xlogy(target, log_q).sum(-1)


def kl_divergence(target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(target || q) per item, in nats."""
    return cross_entropy(target, log_q) - entropy(target)


def worst_case_target(target: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor, epsilon: float):
    """The distribution within total variation ``epsilon`` of ``target`` that maximises CE(., q)."""
    cost = -log_q.detach()
    sink = cost.masked_fill(~mask, float("-inf")).argmax(-1, keepdim=True)  # least probable label
    is_sink = torch.zeros_like(mask).scatter(-1, sink, True)
    budget = torch.clamp(1 - target.gather(-1, sink), max=epsilon)  # [B, 1]
    # Donors in order of increasing cost (most probable first); the sink and padding give nothing.
    donors = ~is_sink & mask
    order = cost.masked_fill(~donors, float("inf")).argsort(-1)
    given = target.masked_fill(~donors, 0).gather(-1, order)
    before = given.cumsum(-1) - given
    taken_sorted = (budget - before).clamp(min=0).minimum(given)
    taken = torch.zeros_like(target).scatter(-1, order, taken_sorted)
    return target - taken + is_sink * taken.sum(-1, keepdim=True)


def majority_cross_entropy(log_q: torch.Tensor, majority: torch.Tensor) -> torch.Tensor:
    """-log q[majority] per item; 0 where there is no unique majority (majority -1)."""
    has = majority >= 0
    picked = log_q.gather(-1, majority.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(has, -picked, torch.zeros_like(picked))


def distribution_loss(
    log_q: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor,
    majority: torch.Tensor,
    ce_weight: float,
    epsilon: float,
) -> torch.Tensor:
    """Mean over items of KL_eps(p || q) + ce_weight * CE(majority)."""
    worst = worst_case_target(target, log_q, mask, epsilon) if epsilon > 0 else target
    adversarial_kl = cross_entropy(worst, log_q) - entropy(target)
    return (adversarial_kl + ce_weight * majority_cross_entropy(log_q, majority)).mean()


def point_loss(log_q: torch.Tensor, majority: torch.Tensor) -> torch.Tensor:
    """Mean over items of CE(majority); every item must have one."""
    if bool((majority < 0).any()):
        raise ValueError("the point objective needs a unique majority label for every item")
    return majority_cross_entropy(log_q, majority).mean()
