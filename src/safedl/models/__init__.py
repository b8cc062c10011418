"""Models: zoo, Normalize wrapper, the shared training loop, checkpoints, user-model plug-ins."""
from safedl.models.checkpoint import load_checkpoint, save_checkpoint
from safedl.models.normalize import Normalize, unwrap, with_normalization
from safedl.models.train import TrainRecipe, TrainReport, accuracy, train_model
from safedl.models.zoo import build_model, model_names

__all__ = ["Normalize", "TrainRecipe", "TrainReport", "accuracy", "build_model", "load_checkpoint", "model_names",
           "save_checkpoint", "train_model", "unwrap", "with_normalization"]

#: the modules that register models (``safedl.registry`` imports exactly these)
COMPONENT_MODULES: tuple[str, ...] = ("zoo", "resnet")
