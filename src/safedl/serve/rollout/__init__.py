"""Canary and shadow releases with automatic promotion and rollback (``safedl serve --canary/--shadow``)."""
from safedl.serve.rollout.config import DEFAULT_RULES, RolloutConfig, load_rollout

__all__ = ["DEFAULT_RULES", "RolloutConfig", "load_rollout"]
