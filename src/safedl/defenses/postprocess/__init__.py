"""Output postprocessors: logits -> hardened scores, against extraction and score-based black-box attacks."""
