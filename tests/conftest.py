"""Shared fixtures: tiny seeded models and data so the suite runs in minutes on 2 CPU cores."""
from __future__ import annotations

import os

import pytest
import torch

from safedl.data import load_builtin, stratified_split
from safedl.models import TrainRecipe, build_model, train_model, with_normalization
from safedl.utils.progress import set_enabled
from safedl.utils.tensors import seed_everything

set_enabled(False)
torch.set_num_threads(1)  # tiny models: threading costs more than it saves
# the model cache (safedl.models.cache) is off in tests, so each test trains what it says it trains; the cache's own
# tests turn it on with a private folder
os.environ["SAFEDL_MODEL_CACHE"] = "off"


@pytest.fixture(scope="session")
def digits_splits():
    """scikit-learn's 8x8 digits, split 70/10/20 with seed 0."""
    return stratified_split(load_builtin("digits"), test_fraction=0.2, val_fraction=0.1, seed=0)


@pytest.fixture(scope="session")
def tiny_model(digits_splits):
    """A tiny CNN trained on 8x8 digits (about 95% test accuracy, a few seconds on CPU)."""
    seed_everything(0)
    net = build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8)
    model = with_normalization(net, digits_splits.mean, digits_splits.std)
    train_model(model, digits_splits.train, recipe=TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none"),
                seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def eval_batch(digits_splits):
    """128 test images and labels."""
    return digits_splits.test.x[:128].clone(), digits_splits.test.y[:128].clone()


def to_color(x: torch.Tensor) -> torch.Tensor:
    """Gray N x 1 x H x W images as 3-channel ones whose channels differ (the image, its mirror, its transpose)."""
    return torch.cat([x, x.flip(-1), x.transpose(-1, -2)], dim=1).contiguous()


@pytest.fixture(scope="session")
def digits_splits_rgb(digits_splits):
    """``digits_splits`` with 3 distinct channels per image (same labels and split)."""
    from safedl.data.dataset import Dataset, Splits

    def color(d):
        return Dataset(to_color(d.x), d.y.clone(), d.num_classes, f"{d.name}_rgb", d.class_names)

    train = color(digits_splits.train)
    return Splits(train=train, val=color(digits_splits.val), test=color(digits_splits.test),
                  mean=tuple(train.x.mean(dim=(0, 2, 3)).tolist()), std=tuple(train.x.std(dim=(0, 2, 3)).tolist()))


@pytest.fixture(scope="session")
def tiny_model_rgb(digits_splits_rgb):
    """The tiny CNN with a 3-channel stem, trained like ``tiny_model`` on the 3-channel digits."""
    seed_everything(0)
    net = build_model("tiny_cnn", in_channels=3, num_classes=10, image_size=8)
    model = with_normalization(net, digits_splits_rgb.mean, digits_splits_rgb.std)
    train_model(model, digits_splits_rgb.train, recipe=TrainRecipe(epochs=15, batch_size=64, lr=3e-3, augment="none"),
                seed=0)
    return model.eval()


@pytest.fixture(params=[1, 3], ids=["1ch", "3ch"])
def channels_case(request):
    """(channels, tiny model, 128 test images, labels, training split) for 1-channel and 3-channel inputs: the
    conformance suites run over both."""
    if request.param == 1:
        splits, model = request.getfixturevalue("digits_splits"), request.getfixturevalue("tiny_model")
    else:
        splits, model = request.getfixturevalue("digits_splits_rgb"), request.getfixturevalue("tiny_model_rgb")
    return request.param, model, splits.test.x[:128].clone(), splits.test.y[:128].clone(), splits.train


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A store URL, once for an SQLite file and once for a database of the throwaway PostgreSQL cluster."""
    if request.param == "sqlite":
        return str(tmp_path / "audit.db")
    return request.getfixturevalue("pg_cluster").database()


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (tests/_postgres.py): skipped without PostgreSQL's binaries,
    a failure when CI is set; removed at the end of the session."""
    from _postgres import Cluster, pg_bindir

    cluster = Cluster(pg_bindir()).start()
    yield cluster
    cluster.remove()


#: modules that run whole assessments (``safedl run`` end to end on tiny data): the slow part of the suite
WHOLE_RUN_MODULES = ("test_data_user_folder", "test_deploy_bundle", "test_e2e_ci", "test_e2e_executors",
                     "test_e2e_extraction", "test_e2e_families", "test_e2e_poisoning", "test_e2e_resnet18_color",
                     "test_e2e_run_spine", "test_evaluate_defend_query", "test_evaluate_suite_shards_run",
                     "test_models_user")


#: modules that start ``safedl serve`` (in process or as processes) or the deployment stack, by name: the serve
#: package's pure units (stores, monitor rules, input cache) are quick tests and stay unmarked
SERVICE_MODULES = ("test_deploy_postgres_stack", "test_redteam_deploy", "test_redteam_gameday", "test_redteam_runner",
                   "test_serve_app", "test_serve_batcher", "test_serve_client", "test_serve_dashboard",
                   "test_serve_decode_hardening", "test_serve_fuzz", "test_serve_keys_audit_cli", "test_serve_limits",
                   "test_serve_metrics_bands", "test_serve_misinformation", "test_serve_monitor", "test_serve_ownership_cli",
                   "test_serve_predict_watermark", "test_serve_predict_poisoning",
                   "test_serve_monitor_drift", "test_serve_process", "test_serve_protocol", "test_serve_redteam",
                   "test_serve_redteam_process", "test_serve_review", "test_serve_review_page",
                   "test_serve_rollout_canary", "test_serve_rollout_checks", "test_serve_rollout_cli", "test_serve_rollout_live",
                   "test_serve_slow_lane", "test_serve_stores_replicas", "test_serve_stores_sqlite_threads",
                   "test_serve_swap", "test_serve_swap_monitor", "test_serve_workers")


def pytest_collection_modifyitems(config, items):
    """Markers from what a test needs, so ``-m "not slow and not browser"`` gives a quick loop: ``browser`` (real
    headless Chromium: the ``browser`` fixture), ``postgres`` (a throwaway PostgreSQL cluster: ``pg_cluster``),
    ``service`` (a running ``safedl serve`` or the deployment stack), ``slow`` (whole assessments)."""
    for item in items:
        module = item.module.__name__ if item.module else ""
        if "browser" in item.fixturenames:
            item.add_marker(pytest.mark.browser)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "pg_cluster" in item.fixturenames or any(isinstance(v, str) and v == "postgresql" for v in params.values()):
            item.add_marker(pytest.mark.postgres)
        if module in SERVICE_MODULES:
            item.add_marker(pytest.mark.service)
        if module in WHOLE_RUN_MODULES:
            item.add_marker(pytest.mark.slow)
