"""Building blocks of the masking-distribution trainer: packed data streams (``data``), the
masking-rate schedule (``schedule``) and the training objectives (``objectives``)."""

from .objectives import ObjectiveBatch, ObjectiveConfig, build_objective_batch, compute_loss, loss_from_logits
from .schedule import MaskingRateSchedule

__all__ = ["ObjectiveBatch", "ObjectiveConfig", "build_objective_batch", "compute_loss", "loss_from_logits",
           "MaskingRateSchedule"]
