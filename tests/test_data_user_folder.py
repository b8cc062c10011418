"""A user's own image folder: sizes and modes converted by documented keys, EXIF honoured, class counts checked, and
a real-photo folder run end to end (named in the report) and resumed from another working directory."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from safedl.cli import app
from safedl.data import Dataset, load_image_folder, stratified_split
from safedl.errors import DataError, ProfileError
from safedl.profile import parse_profile


def _save(img: Image.Image, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((4, 8), dtype=np.uint8)
    arr[:, :4] = 255  # stored: left half white, 4 high x 8 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the upright image is 8 high x 4 wide, white on top
    for cls in ("a", "b"):
        _save(Image.fromarray(arr, "L"), tmp_path / cls / "x.png", exif=exif)
    d = load_image_folder(tmp_path)
    assert d.x.shape == (2, 1, 8, 4)
    assert bool((d.x[0, 0, :4] == 1).all()) and bool((d.x[0, 0, 4:] == 0).all())


def test_every_mode_converts_to_the_asked_channels(tmp_path):
    rgb = np.zeros((6, 6, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    rgba = np.dstack([rgb, np.full((6, 6), 255, np.uint8)])
    rgba[:3, :, 3] = 0  # top half fully transparent: composited over black
    pal = Image.fromarray(rgb, "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    images = {"rgb.jpg": Image.fromarray(rgb, "RGB"), "gray.png": Image.fromarray(rgb[..., 0], "L"),
              "alpha.png": Image.fromarray(rgba, "RGBA"), "pal.png": pal,
              "la.png": Image.fromarray(rgba[..., [0, 3]], "LA")}
    for name, im in images.items():
        _save(im, tmp_path / "c" / name)
        _save(im, tmp_path / "d" / name)
    with pytest.raises(DataError, match=r"dataset\.channels"):  # mixed modes without channels: the keys are named
        load_image_folder(tmp_path)
    d3 = load_image_folder(tmp_path, channels=3)
    d1 = load_image_folder(tmp_path, channels=1)
    assert d3.x.shape == (10, 3, 6, 6) and d1.x.shape == (10, 1, 6, 6)
    files = sorted(images)  # the loader's order within a class
    alpha = d3.x[files.index("alpha.png")]
    assert float(alpha[:, :3].max()) == 0.0 and abs(float(alpha[0, 3:].mean()) - 200 / 255) < 0.01
    assert abs(float(d3.x[files.index("pal.png"), 0].mean()) - 200 / 255) < 0.02


def test_resize_policies(tmp_path):
    arr = np.full((8, 16, 3), 255, dtype=np.uint8)
    arr[:, :4] = (255, 0, 0)  # a red stripe at the left quarter
    for cls in ("a", "b"):
        _save(Image.fromarray(arr, "RGB"), tmp_path / cls / "x.png")
    stretch = load_image_folder(tmp_path, size=(8, 8), resize="stretch").x[0]
    crop = load_image_folder(tmp_path, size=(8, 8), resize="center_crop").x[0]
    box = load_image_folder(tmp_path, size=(8, 8), resize="letterbox").x[0]
    red = lambda x: bool(((x[0] > 0.9) & (x[1] < 0.1)).any())  # noqa: E731
    assert red(stretch) and not red(crop) and red(box)  # the centre crop drops the left quarter
    assert float(box[:, :2].max()) == 0.0 and float(box[:, 2:6, 4:].min()) > 0.9  # black bars above and below
    with pytest.raises(DataError, match="resize"):
        load_image_folder(tmp_path, size=(8, 8), resize="squash")


def test_profile_dataset_keys_are_checked():
    ok = parse_profile({"dataset": {"format": "image_folder", "path": "x", "image_size": [24, 32], "channels": 1,
                                    "resize": "letterbox"}, "baseline_only": True})
    assert ok.dataset.target_size == (24, 32) and ok.dataset.name is None
    bad = [{"image_size": [0, 8]}, {"image_size": [8, 8, 8]}, {"channels": 4}, {"resize": "center_crop"},
           {"format": "npz", "channels": 3}]
    for extra in bad:
        ds = {"format": "image_folder", "path": "x", **extra}
        with pytest.raises(ProfileError):
            parse_profile({"dataset": ds, "baseline_only": True})


def test_one_class_or_tiny_class_is_refused_with_the_counts():
    x = torch.rand(20, 1, 4, 4)
    one = Dataset(x, torch.zeros(20, dtype=torch.long), 1, "mine", ["cats"])
    with pytest.raises(DataError, match=r"cats: 20"):
        stratified_split(one, test_fraction=0.2, val_fraction=0.1, seed=0)
    tiny = Dataset(x, torch.tensor([0] * 18 + [1] * 2), 2, "mine", ["cats", "dogs"])
    with pytest.raises(DataError, match=r"dogs.*fewer than 3.*cats: 18, dogs: 2"):
        stratified_split(tiny, test_fraction=0.2, val_fraction=0.1, seed=0)
    stratified_split(tiny, test_fraction=0.2, val_fraction=0.0, seed=0)  # 2 suffice without a validation split


# ------------------------------------------------------------------------------------------ real photographs end to end

def _photo_folder(root):
    """Crops of scikit-learn's two sample photographs in mixed sizes and modes, one class per photograph."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    exif = Image.Exif()
    exif[0x0112] = 8
    for name, arr in zip(("china", "flower"), photos.images):
        im = Image.fromarray(arr)
        for k in range(6):
            top, left, h, w = 40 * k, 50 * k, 120 + 20 * k, 150 + 10 * k
            crop = im.crop((left, top, left + w, top + h))
            kind = k % 5
            if kind == 0:
                _save(crop, root / name / f"{k}.jpg", quality=90)
            elif kind == 1:
                rgba = crop.convert("RGBA")
                rgba.putalpha(Image.linear_gradient("L").resize(crop.size))
                _save(rgba, root / name / f"{k}.png")
            elif kind == 2:
                _save(crop.convert("L"), root / name / f"{k}.png")
            elif kind == 3:
                _save(crop.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), root / name / f"{k}.png")
            else:
                _save(crop, root / name / f"{k}.jpg", exif=exif)


PHOTO_PROFILE = {
    "name": "photos", "seed": 0,
    "dataset": {"format": "image_folder", "path": "photos", "image_size": [12, 16], "channels": 3,
                "resize": "center_crop", "test_fraction": 0.34, "val_fraction": 0.17},
    "model": {"arch": "tiny_cnn", "params": {"width": 4, "hidden": 8}},
    "training": {"epochs": 1, "batch_size": 8, "augment": "none"},
    "attacks": {"evasion": [{"name": "fgsm", "params": {"eps": 0.05}}]},
    "evaluation": {"n_eval": 500, "batch_size": 50, "n_examples": 2, "gate": {"min_clean_accuracy": 0.0}},
    "output": {"dir": "runs", "html": False, "figures": False},
}


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("photos")
    _photo_folder(home / "photos")
    (home / "p.yaml").write_text(yaml.safe_dump(PHOTO_PROFILE))
    res = CliRunner().invoke(app, ["run", str(home / "p.yaml"), "--runs-dir", str(home / "runs"), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    return home, next((home / "runs").iterdir())


def test_photo_folder_runs_and_the_report_names_data_and_classes(photo_run):
    home, run_dir = photo_run
    r = json.loads((run_dir / "results.json").read_text())
    assert r["data"]["name"] == "photos" and r["data"]["class_names"] == ["china", "flower"]
    assert r["data"]["shape"] == [3, 12, 16] and r["data"]["path"] == str((home / "photos").resolve())
    assert any("n_eval = 500 is larger than the test split" in n for n in r["baseline"]["notes"])
    md = (run_dir / "report.md").read_text()
    assert "**photos**" in md and "china, flower" in md and "(china)" in md  # header and per-class rows
    # the built-in set appears only where a recommendation cites a prior measured on it (executive summary)
    assert all("mnist5k" not in line or "prior (not measured in this run)" in line for line in md.splitlines())
    assert not (run_dir / "report.html").exists()  # output.html: false honoured
    saved = yaml.safe_load((run_dir / "profile.yaml").read_text())
    assert os.path.isabs(saved["dataset"]["path"])


def test_report_command_honours_output_flags(photo_run):
    _, run_dir = photo_run
    res = CliRunner().invoke(app, ["report", str(run_dir)])
    assert res.exit_code == 0 and not (run_dir / "report.html").exists()
    res = CliRunner().invoke(app, ["report", str(run_dir), "--html"])
    assert res.exit_code == 0 and (run_dir / "report.html").is_file()
    (run_dir / "report.html").unlink()


def test_resume_from_another_directory_verifies_stages_and_data(photo_run, tmp_path, monkeypatch):
    home, original = photo_run
    run_dir = tmp_path / "copy"
    shutil.copytree(original, run_dir)
    monkeypatch.chdir(tmp_path)  # the profile's relative data path must not be resolved against this folder
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*/stage.json")}
    res = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    assert {p.parent.name: p.stat().st_mtime_ns for p in (run_dir / "stages").glob("*/stage.json")} == stamps
    state = run_dir / "stages" / "attack-fgsm" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated: must be redone, not reused
    res = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--no-progress", "-q"])
    assert res.exit_code == 0, res.output
    assert (run_dir / "stages" / "attack-fgsm" / "stage.json").stat().st_mtime_ns != stamps["attack-fgsm"]
    assert (run_dir / "stages" / "baseline" / "stage.json").stat().st_mtime_ns == stamps["baseline"]
    before = json.loads((original / "results.json").read_text())["attacks"][0]["metrics"]["robust_accuracy"]
    after = json.loads((run_dir / "results.json").read_text())["attacks"][0]["metrics"]["robust_accuracy"]
    assert before == after
    victim = next((home / "photos" / "china").glob("*.jpg"))
    saved = victim.read_bytes()
    try:
        Image.new("RGB", (40, 30), (9, 9, 9)).save(victim)
        res = CliRunner().invoke(app, ["run", "--resume", str(run_dir), "--no-progress", "-q"])
        assert res.exit_code == 2 and "data changed" in res.output and "Traceback" not in res.output
    finally:
        victim.write_bytes(saved)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "profile.yaml").write_text((run_dir / "profile.yaml").read_text())
    (foreign / "notes.txt").write_text("mine")
    res = CliRunner().invoke(app, ["run", "--resume", str(foreign), "--no-progress", "-q"])
    assert res.exit_code == 2 and "not a safedl run directory" in res.output
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt", "profile.yaml"]  # nothing written into it


def test_stage_state_packing_is_lossless_and_smaller(digits_splits, tmp_path):
    import io

    from safedl.run.state import load_stage_state, pack_state
    from safedl.data.dataset import PoisonedDataset

    train = digits_splits.train
    x = train.x.clone()
    x[:5, :, :2, :2] = 1.0  # a patch on five images
    y = train.y.clone()
    y[5:9] = 0
    poisoned = PoisonedDataset.from_clean(train, x=x, y=y, info={"target_class": 0})
    adv = (train.x[:50] + 0.1234).clamp(0, 1)  # not 8-bit values: stored as is
    x8 = torch.randint(0, 256, (500, 3, 8, 8), generator=torch.Generator().manual_seed(0)).float() / 255  # 8-bit
    state = {"poisoned": poisoned, "x": x8, "x_adv": adv, "model_state": {"w": torch.randn(3, 3)}}
    path = tmp_path / "state.pt"
    torch.save(pack_state(state), path)
    back = load_stage_state(path)
    p = back["poisoned"]
    assert isinstance(p, PoisonedDataset) and p.n_poison == 9 and p.info == {"target_class": 0}
    for field in ("x", "y", "original_x", "original_y", "is_poison"):
        assert torch.equal(getattr(p, field), getattr(poisoned, field)), field
    assert torch.equal(back["x"], state["x"]) and torch.equal(back["x_adv"], adv)
    assert torch.equal(back["model_state"]["w"], state["model_state"]["w"])
    plain = io.BytesIO()
    torch.save(state, plain)
    assert path.stat().st_size < plain.tell() / 2
    x8_alone = io.BytesIO()
    torch.save(pack_state({"x": x8}), x8_alone)
    assert x8_alone.tell() < x8.numel() * 4 / 3  # stored as uint8, not float32
