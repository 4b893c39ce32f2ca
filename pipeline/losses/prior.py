"""Where a loss wants a class's score to start: its stationary point on a label-free prior.

Starting every class at its prevalence is right for plain BCE only. A weighted loss pulls the
score of class c towards the point where the expected gradient of its pairs vanishes; for the
BCE-like losses here with weights w^+, w^- on positives and negatives and a detached focusing
factor of exponent g, that is about logit q* = (logit pi_c + log(w^+ / w^-)) / (g + 1) (the
dual-weighted loss divides its focusing factor by the cell mean, so g drops out there:
logit q* = logit pi_c + log(b^+ / b^-)). Rather than keep one formula per loss, the offset is
found numerically with the loss itself, so every loss (and every future one) starts where its own
gradient says, on the spread of logits the network actually gives at initialisation.
"""

from __future__ import annotations

import torch

from .base import PairLoss


def expected_gradient(
    loss: PairLoss, logits: torch.Tensor, prevalence: torch.Tensor, offset: torch.Tensor
) -> torch.Tensor:
    """d E[loss] / d offset_c when each image is positive for class c with probability pi_c.

    Args:
        loss: the training loss; its running statistics are read, never updated.
        logits: (N, C) logits of a sample of training images.
        prevalence: (C,) pi, the training-split positive rates.
        offset: (C,) shift added to every image's logits.

    Returns:
        (C,) expected gradient; classes do not interact, so each entry is one class's.
    """
    with torch.enable_grad():
        o = offset.detach().clone().requires_grad_()
        z = logits.detach() + o  # (N, C)
        both = torch.cat([z, z])  # (2N, C): every image once as a positive, once as a negative
        y = torch.cat([torch.ones_like(z), torch.zeros_like(z)])
        per_pair, _ = loss.pair_losses(both, y, update=False)  # (2N, C)
        n = z.shape[0]
        expected = prevalence * per_pair[:n].mean(0) + (1 - prevalence) * per_pair[n:].mean(0)  # (C,)
        (grad,) = torch.autograd.grad(expected.sum(), o)
    return grad


@torch.no_grad()
def stationary_offsets(
    loss: PairLoss, logits: torch.Tensor, prevalence: torch.Tensor, bound: float = 30.0, iters: int = 60
) -> torch.Tensor:
    """Per-class shift o with zero expected gradient of `loss` at logits + o, by bisection.

    Args:
        loss: the training loss.
        logits: (N, C) logits of a random sample of training images.
        prevalence: (C,) training-split positive rates in (0, 1).
        bound: the search bracket [-bound, bound] in logit units.
        iters: bisection steps (60 halve the bracket to ~5e-17 of its width).

    Returns:
        (C,) offsets, in the logits' dtype. The expected gradient rises with o for every loss here
        (positives pull up, negatives push down), so the sign change is unique.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    pi = prevalence.to(device=logits.device, dtype=dtype).clamp(1e-6, 1 - 1e-6)  # (C,)
    lo = torch.full_like(pi, -bound)
    hi = torch.full_like(pi, bound)
    for _ in range(iters):
        mid = (lo + hi) / 2
        rising = expected_gradient(loss, logits, pi, mid) > 0  # past the minimum: go lower
        hi, lo = torch.where(rising, mid, hi), torch.where(rising, lo, mid)
    return (lo + hi) / 2
