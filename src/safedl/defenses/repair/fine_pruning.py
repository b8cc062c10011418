"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks", RAID 2018).

Backdoor behaviour tends to live in channels of the last convolutional layer that stay dormant on clean inputs.
Channels are pruned in increasing order of their mean activation on clean data, one ``step`` at a time, until the
clean accuracy (measured on the clean set) has dropped by more than ``max_accuracy_drop`` below the unpruned model's;
the last pruning that stayed within the bound is kept (the paper stops at a 4% drop). The pruned model is then
fine-tuned on the small clean set (``epochs`` passes of Adam at a constant learning rate ``lr``, no augmentation),
with the pruned channels held at zero. Fine-tuning is what removes a backdoor that also lives in channels active on
clean data (the paper's pruning-aware case, and what a 10% dirty-label patch gives on mnist5k: triggered inputs
raise the activation of nearly every last-conv channel, so pruning alone leaves the attack success rate at 1.0).
The defaults (10 epochs at 3e-3) were chosen on mnist5k seed 0 with bench/measure_poisoning_defenses.py (5 epochs
at 5e-4 leaves the backdoor in place). Over seeds 0-4 (10% patch backdoor, 500-image clean set; ``--seed k --part
backdoor --scenarios 0.1 --defenses fine_pruning``) the attack success rate falls from 1.0 to 0.066, 0.023, 0.131,
0.136, 0.030 (mean 0.077, t-interval [0.010, 0.144]) and clean accuracy ends at 0.951-0.956 whatever the baseline,
1.5-3.2 points below it (mean 2.4 [1.5, 3.2]): the small clean set caps what fine-tuning keeps. No other
fine-tuning (shift augmentation, 20 epochs, cosine decay, SGD, early stopping on a held-out fifth, a 2% bound,
freezing the layers before the pruned one, distillation from the unrepaired model) reached ASR <= 0.10 within 2
points on both seeds 0 and 1 (bench/ablate_fine_pruning.py). Neural Cleanse's targeted unlearning keeps more.
Re-checked where the defaults were not chosen (bench/measure_poison_generalization.py ``--extra fine_pruning``: the
default next to prune-only, the paper's pruning step alone, and 5 epochs at 5e-4): on 8x8 digits (seeds 0-2, targets
0/3/8, four triggers, 12 cells) the default leaves a lower ASR than 5 epochs at 5e-4 in 11 of 12 cells (clean
accuracy -2.5 to +1.4 points against it) and prune-only leaves most of the backdoor (ASR 0.16-1.0); the default
reaches ASR <= 0.10 in 4 of 12 (two blended-noise cells, the random patch, the weak all-to-all checkerboard), never
on the all-to-one checkerboard (0.52-0.83). On mnist5k cells it was not chosen on (target 3: single pixel, blended
noise, random patch at 5%, random patch 10%, checkerboard 10% seeds 1-2 and to class 0): default ASR 0.011-0.073
except 0.271 for the checkerboard to class 0, against 0.030-0.991 with 5 epochs at 5e-4 and 0.149-0.998 prune-only
(lower in 7 of 7). The defaults are kept.
"""
from __future__ import annotations

from typing import ClassVar

import copy
import logging

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.repair._common import last_conv, make_permanent, mask_units, mean_activation
from safedl.models.train import TrainRecipe, accuracy, train_model
from safedl.registry import register
from safedl.utils.validate import check_fraction, check_positive, check_range

log = logging.getLogger(__name__)


@register("repair", "fine_pruning")
class FinePruning:
    """Prune dormant last-conv channels until clean accuracy drops by ``max_accuracy_drop``, then fine-tune."""

    model_needs: tuple[str, ...] = ("conv",)  # what the model must offer (safedl.models.features.model_problems)
    trusted_data: ClassVar[str] = "required"
    report_: dict = {}

    def diagnostic_images(self) -> dict[str, tuple[torch.Tensor, list[str]]]:
        """No images (RepairProtocol)."""
        return {}

    def __init__(self, *, max_accuracy_drop: float = 0.04, step: int = 1, max_ratio: float = 0.95, epochs: int = 10,
                 lr: float = 3e-3, batch_size: int = 64):
        self.max_accuracy_drop = check_fraction(self, "max_accuracy_drop", max_accuracy_drop, allow_zero=True)
        self.step = check_range(self, "step", step, low=1, integer=True)
        self.max_ratio = check_fraction(self, "max_ratio", max_ratio, allow_one=False)
        self.epochs = check_range(self, "epochs", epochs, low=0, integer=True)
        self.lr = check_positive(self, "lr", lr)
        self.batch_size = check_range(self, "batch_size", batch_size, low=1, integer=True)

    def repair(self, model: nn.Module, *, clean: Dataset, device: str | torch.device = "cpu", seed: int = 0) -> nn.Module:
        dev = torch.device(device)
        m = copy.deepcopy(model).to(dev).eval()
        conv = last_conv(m)
        order = torch.argsort(mean_activation(m, conv, clean.x))  # most dormant first
        base_acc = accuracy(m, clean, device=dev)
        limit = int(self.max_ratio * len(order))
        w0 = conv.weight.detach().clone()
        b0 = None if conv.bias is None else conv.bias.detach().clone()
        kept, trace = 0, []
        for k in range(self.step, limit + 1, self.step):
            # zeroing the weights of the first k channels is the same forward pass as masking them
            with torch.no_grad():
                conv.weight.copy_(w0)
                conv.weight[order[:k]] = 0
                if b0 is not None:
                    conv.bias.copy_(b0)
                    conv.bias[order[:k]] = 0
            acc = accuracy(m, clean, device=dev)
            trace.append((k, acc))
            if base_acc - acc > self.max_accuracy_drop:
                break
            kept = k
        with torch.no_grad():
            conv.weight.copy_(w0)
            if b0 is not None:
                conv.bias.copy_(b0)
        if kept:
            mask_units(conv, order[:kept])
        pruned_acc = accuracy(m, clean, device=dev)
        if self.epochs:
            recipe = TrainRecipe(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, schedule="constant",
                                 augment="none")
            train_model(m, clean, recipe=recipe, seed=seed, device=dev, description="fine-pruning: fine-tune")
        self.report_ = {"channels": len(order), "pruned": int(kept), "clean_accuracy_before": base_acc,
                        "clean_accuracy_pruned": pruned_acc, "prune_trace": trace[-5:]}
        log.info("fine_pruning: pruned %d/%d channels", kept, len(order))
        return make_permanent(m).eval()
