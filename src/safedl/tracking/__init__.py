"""Experiment tracking: runs and bundles recorded in an MLflow tracking server or store (``safedl[mlflow]``)."""
