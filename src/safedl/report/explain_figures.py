"""Figure: clean vs adversarial inputs next to their integrated-gradients maps (``safedl.models.explain``)."""
from __future__ import annotations

import torch


def explanation_figure(path, x: torch.Tensor, x_adv: torch.Tensor, a_clean: torch.Tensor, a_adv: torch.Tensor,
                       titles: list[tuple[str, str]]) -> None:
    """One row per input: clean image, |IG| of its predicted class, adversarial image, |IG| of its prediction.
    ``titles``: (clean caption, adversarial caption) per row. The maps share one colour scale per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(x)
    fig, axes = plt.subplots(n, 4, figsize=(6.4, 1.7 * n + 0.5), squeeze=False)
    heads = ["clean", "IG (clean)", "adversarial", "IG (adversarial)"]
    for i in range(n):
        mc, ma = a_clean[i].abs().sum(0), a_adv[i].abs().sum(0)
        top = float(torch.maximum(mc.max(), ma.max()).clamp_min(1e-12))
        for j, (img, cap) in enumerate([(x[i], titles[i][0]), (mc, ""), (x_adv[i], titles[i][1]), (ma, "")]):
            ax = axes[i][j]
            ax.axis("off")
            if j in (0, 2):
                arr = img.permute(1, 2, 0).numpy()
                ax.imshow(arr.squeeze(-1) if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.numpy(), cmap="inferno", vmin=0, vmax=top)
            ax.set_title(f"{heads[j]}\n{cap}" if i == 0 else cap, fontsize=7)
    fig.suptitle("Integrated gradients (Sundararajan et al. 2017) of the predicted class, clean vs adversarial",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
