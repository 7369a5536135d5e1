"""Evaluations of a trained (or any checkpointed) model, each built once and called per model.

- `LinearProbe`: a linear multi-label classifier on frozen encoder features, scored
  on the validation and/or test split.
- `HeldoutLoss`: the stage-1 loss on a fixed held-out batch with fixed views.
- `save_test_outputs`: test features, scores and labels to an npz, for later analyses.
- `joint_classifier_scores`: scores of the classifier trained with `method = "joint"`.
"""

from sdjax.evaluators.heldout_loss import HeldoutLoss
from sdjax.evaluators.joint_classifier import joint_classifier_scores
from sdjax.evaluators.linear_probe import LinearProbe, ProbeResult
from sdjax.evaluators.test_outputs import save_test_outputs

__all__ = [
    "HeldoutLoss",
    "LinearProbe",
    "ProbeResult",
    "joint_classifier_scores",
    "save_test_outputs",
]
