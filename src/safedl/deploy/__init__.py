"""Protection: the defended system as one object (SecurePipeline) and verified bundles of it."""
from safedl.deploy.bundle import Bundle, export_bundle, load_bundle
from safedl.deploy.pipeline import Decision, SecurePipeline

__all__ = ["Bundle", "Decision", "SecurePipeline", "export_bundle", "load_bundle"]
