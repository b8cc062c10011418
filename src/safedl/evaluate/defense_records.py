"""What a defense entry records about the defended model and the data it removed: the clean confusion matrix and
example images of removed training samples (for ``safedl export-results --layout safe-dl``)."""
from __future__ import annotations

import torch
from torch import nn

from safedl.data.dataset import PoisonedDataset
from safedl.evaluate.context import RunContext
from safedl.report.stage_figures import save_png
from safedl.utils.confusion import confusion_counts
from safedl.utils.tensors import predict


def clean_confusion(ctx: RunContext, model: nn.Module) -> list[list[int]]:
    """The defended model's full confusion matrix on the clean test split (row = true class)."""
    test = ctx.splits.test
    return confusion_counts(predict(model, test.x.to(ctx.device)).cpu(), test.y, test.num_classes)


MAX_EXAMPLES = 5  # removed-sample images saved per cleanser (safedl export-results --layout safe-dl)


def removed_examples(ctx: RunContext, stem: str, res, poisoned: PoisonedDataset) -> list[dict]:
    """Up to min(5, evaluation.n_examples) removed training images, highest score first, one PNG each."""
    flagged = torch.nonzero(res.is_suspect).flatten()
    n = min(MAX_EXAMPLES, ctx.profile.evaluation.n_examples, len(flagged))
    if n == 0:
        return []
    show = flagged[torch.argsort(res.score[flagged], descending=True)][:n]
    d, out = ctx.artifact_dir("defenses"), []
    for j, i in enumerate(show.tolist()):
        p = d / f"{stem}_removed{j}.png"
        save_png(p, poisoned.x[i].cpu())
        out.append({"path": ctx.rel(p), "index": int(i), "label": int(poisoned.y[i]),
                    "true_poison": bool(poisoned.is_poison[i])})
    return out
