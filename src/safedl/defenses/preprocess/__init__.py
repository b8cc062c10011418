"""Input preprocessors (nn.Module with a ``differentiable`` flag so adaptive attacks know to use BPDA/EOT)."""
