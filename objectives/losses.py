"""Loss terms of the distill stage. Each returns per-example values so data sources can be weighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Knowledge distillation (Hinton, Vinyals & Dean, 2015), per example:

        T^2 * KL(softmax(t / T) || softmax(s / T)) = T^2 * sum_k p_k (log p_k - log q_k)

    with p = softmax(t/T), q = softmax(s/T). The T^2 factor keeps the gradient scale independent of T.
    """
    t = F.log_softmax(teacher_logits / temperature, dim=1)
    s = F.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * (t.exp() * (t - s)).sum(dim=1)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                 alpha: float, temperature: float) -> torch.Tensor:
    """Per-example `alpha * T^2 * KL(...) + (1 - alpha) * CE(labels)` (Hinton et al., 2015). An unlabelled example
    (labels None) has no label term, only `alpha * T^2 * KL(...)`: Hinton's transfer set, weighted like the KD term
    of a labelled one, so alpha 0 gives it no loss at all (no teacher signal)."""
    kd = kd_loss(student_logits, teacher_logits, temperature) if alpha > 0 else None
    if labels is None:
        return alpha * kd if kd is not None else torch.zeros(len(student_logits), device=student_logits.device)
    label_term = F.cross_entropy(student_logits, labels, reduction="none")
    if kd is None:
        return label_term
    return alpha * kd + (1 - alpha) * label_term
