"""Model zoo, Normalize, checkpoints and user models (entry points, TorchScript)."""
from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from safedl.errors import CheckpointError, ConfigError, UnknownComponentError
from safedl.models import Normalize, build_model, load_checkpoint, model_names, save_checkpoint, unwrap, with_normalization
from safedl.models.user import load_entry_point, load_torchscript


@pytest.mark.parametrize("name,channels,size", [
    ("small_cnn", 1, 28), ("small_cnn", 3, 32), ("small_cnn", 1, 8),
    ("mlp", 1, 28), ("mlp", 3, 8),
    ("resnet_small", 3, 32), ("resnet_small", 1, 28),
    ("tiny_cnn", 1, 8), ("tiny_cnn", 3, 32),
])
def test_zoo_builds_for_its_input_sizes(name, channels, size):
    torch.manual_seed(0)
    net = build_model(name, in_channels=channels, num_classes=7, image_size=size).eval()
    x = torch.rand(3, channels, size, size)
    logits = net(x)
    assert logits.shape == (3, 7) and logits.dtype == torch.float32
    feats = net.features(x)
    assert feats.ndim == 2 and feats.shape[0] == 3
    assert isinstance(net.classifier, nn.Linear) and net.classifier.in_features == feats.shape[1]
    assert torch.allclose(net.classifier(feats), logits, atol=1e-6)  # logits = classifier(features)


def test_zoo_lists_models_and_rejects_unknown():
    assert {"small_cnn", "mlp", "resnet_small", "tiny_cnn"} <= set(model_names())
    with pytest.raises(UnknownComponentError, match="small_cnn"):
        build_model("vgg16", in_channels=1, num_classes=10, image_size=28)


def test_normalize_is_per_channel_affine_and_differentiable():
    norm = Normalize((0.1, 0.5, 0.9), (0.2, 0.25, 0.5))
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    out = norm(x)
    for c, (m, s) in enumerate(zip((0.1, 0.5, 0.9), (0.2, 0.25, 0.5))):
        assert torch.allclose(out[:, c], (x[:, c] - m) / s)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(g[:, 1], torch.full_like(g[:, 1], 4.0))
    net = nn.Linear(1, 1)
    wrapped = with_normalization(net, (0.5,), (0.5,))
    assert unwrap(wrapped) is net and unwrap(net) is net
    assert set(dict(wrapped.named_buffers())) == {"0.mean", "0.std"}  # saved with the weights


def _meta(**extra):
    return {"arch": "tiny_cnn", "arch_params": {"width": 4}, "in_channels": 1, "num_classes": 10, "image_size": 8,
            "mean": [0.3], "std": [0.4], **extra}


def _model():
    torch.manual_seed(1)
    net = build_model("tiny_cnn", in_channels=1, num_classes=10, image_size=8, width=4)
    return with_normalization(net, [0.3], [0.4]).eval()


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = _model()
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, _meta(data_hash="abc", accuracy=0.97))
    loaded, meta = load_checkpoint(path)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert not loaded.training and meta["data_hash"] == "abc" and meta["accuracy"] == 0.97
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary files left


@pytest.mark.parametrize("case", ["missing", "garbage", "truncated", "wrong_arch", "no_meta"])
def test_bad_checkpoint_gives_checkpoint_error_naming_file(tmp_path, case):
    path = tmp_path / "m.pt"
    if case != "missing":
        save_checkpoint(path, _model(), _meta())
    if case == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    elif case == "wrong_arch":  # weights do not fit the declared architecture
        save_checkpoint(path, _model(), _meta(arch_params={"width": 8}))
    elif case == "no_meta":
        torch.save({"state_dict": _model().state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def _write_module(tmp_path, monkeypatch, name: str, body: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_point_builds_user_model(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "safedl_user_model_a", """
        import torch
        from torch import nn

        def build(num_classes=10, hidden=5):
            torch.manual_seed(0)
            return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

        def not_a_model():
            return 42
    """)
    model = load_entry_point("safedl_user_model_a:build", num_classes=3, hidden=4)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3) and model[1].out_features == 4
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        load_entry_point("safedl_user_model_a:not_a_model")
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_entry_point("safedl_user_model_a:missing_function")
    with pytest.raises(ConfigError, match="cannot be imported"):
        load_entry_point("safedl_no_such_module_xyz:build")
    with pytest.raises(ConfigError, match="module:function"):
        load_entry_point("safedl_user_model_a.build")
    with pytest.raises(ConfigError, match="rejected its arguments"):
        load_entry_point("safedl_user_model_a:build", depth=3)


def test_entry_point_module_that_fails_on_import(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "safedl_user_model_broken", """
        raise RuntimeError("needs a GPU driver")
    """)
    with pytest.raises(ConfigError, match="needs a GPU driver"):
        load_entry_point("safedl_user_model_broken:build")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_round_trip_and_errors(tmp_path):
    model = _model()
    path = tmp_path / "model.ts"
    torch.jit.script(model).save(str(path))
    loaded = load_torchscript(path)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ConfigError, match="not found") as info:
        load_torchscript(tmp_path / "missing.ts")
    assert "missing.ts" in str(info.value)
    bad = tmp_path / "bad.ts"
    bad.write_bytes(b"junk")
    with pytest.raises(ConfigError) as info:
        load_torchscript(bad)
    assert str(bad) in str(info.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", model_names())
def test_every_zoo_model_exports_to_torchscript(tmp_path, name):
    torch.manual_seed(0)
    channels, size = (3, 32) if name == "resnet_small" else (1, 8)
    model = with_normalization(build_model(name, in_channels=channels, num_classes=4, image_size=size),
                               [0.5] * channels, [0.25] * channels).eval()
    path = tmp_path / f"{name}.ts"
    torch.jit.script(model).save(str(path))
    x = torch.rand(2, channels, size, size)
    assert torch.allclose(load_torchscript(path)(x), model(x), atol=1e-6)
