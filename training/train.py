"""Moved: this module was split into config, tensors, forward, loops and evaluate. It re-exports the old names only
until every importer in the repository imports the new modules (import from those, not from here)."""
from .config import TrainConfig, backbone_config_for  # noqa: F401
from .evaluate import evaluate_backbone, evaluate_policy, evaluate_sae  # noqa: F401
from .forward import Forward, run_model  # noqa: F401
from .loops import collect_policy_inputs, make_policy, train_backbone, train_policy, train_sae  # noqa: F401
from .tensors import augment, to_tensor  # noqa: F401

__all__ = ["TrainConfig", "Forward", "to_tensor", "augment", "run_model", "train_backbone", "train_policy",
           "collect_policy_inputs", "train_sae", "evaluate_backbone", "evaluate_policy", "evaluate_sae",
           "backbone_config_for", "make_policy"]
