"""The loss terms of ``dhp_fx.distill``, each a masked mean over real (non-padding) positions."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .distill_io import LABEL_PAD


def position_mask(kwargs: dict, shape: torch.Size, device: torch.device) -> Optional[torch.Tensor]:
    """float mask over an output's positions (shape = output.shape[:-1]) from the batch, if it fits.

    Decoder outputs go with decoder_attention_mask, encoder/decoder-only ones with attention_mask;
    a mask that does not line up with the output is not used (every position counts).
    """
    for key in ("decoder_attention_mask", "attention_mask"):
        mask = kwargs.get(key)
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(shape):
            return mask.to(device=device, dtype=torch.float32)
    return None


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(softmax(z_t/T) ‖ softmax(z_s/T))·T², averaged over positions.

    The T² keeps the gradient scale independent of T (Hinton et al., 2015), so λ_kd means the
    same at every temperature.
    """
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return _masked_mean(kl, mask) * (t * t)


def hidden_distance(student: torch.Tensor, teacher: torch.Tensor, kind: str,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """"cosine" (1 − cos per position), "mse" (mean square per position) or "cosine+mse"."""
    s, t = student.float(), teacher.float()
    if s.dim() == 1:
        s, t = s[None], t[None]
    total = s.new_zeros(())
    if "cosine" in kind:
        total = total + _masked_mean(1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8), mask)
    if "mse" in kind:
        total = total + _masked_mean((s - t).square().mean(-1), mask)
    return total


def task_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE on labels shaped like logits[..., 0] (positions marked -100 ignored)."""
    labels = labels.to(logits.device)
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not fit logits of shape {tuple(logits.shape)} "
                         "(expected logits.shape[:-1])")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                           ignore_index=LABEL_PAD)


def token_cosine(student: torch.Tensor, teacher: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[float, float]:
    """(sum of cosines over positions, number of positions) for running means in evaluation."""
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-8)
    if mask is None:
        return float(cos.sum()), float(cos.numel())
    return float((cos * mask).sum()), float(mask.sum())


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
             mask: Optional[torch.Tensor]) -> tuple[float, float]:
    """(sum of KL(teacher ‖ student) over positions at T = 1, number of positions)."""
    log_p_s = F.log_softmax(student_logits.float(), dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float(), dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if mask is None:
        return float(kl.sum()), float(kl.numel())
    return float((kl * mask).sum()), float(mask.sum())
