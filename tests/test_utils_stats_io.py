"""Statistics (Wilson, Clopper-Pearson, metric dicts), atomic writes and content hashes."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from scipy import stats as st

from safedl.utils.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text, json_hash, tensor_hash
from safedl.utils.stats import Z95, clopper_pearson, mean_metric, proportion, scalar, wilson_interval


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17:857-872, Table I
# (method 3, score interval without continuity correction), plus the textbook 0/10 and 5/10 cases.
@pytest.mark.parametrize("k,n,lo,hi", [
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634),
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0),
])
def test_wilson_matches_published_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=6e-5)


@pytest.mark.parametrize("k,n", [(1, 10), (7, 13), (250, 1000), (999, 1000)])
def test_wilson_endpoints_solve_the_score_equation(k, n):
    """The Wilson interval is {p : |k/n - p| <= z sqrt(p(1-p)/n)}; each finite endpoint makes it an equality."""
    for p in wilson_interval(k, n):
        if 0.0 < p < 1.0:
            assert abs(k / n - p) == pytest.approx(Z95 * math.sqrt(p * (1 - p) / n), rel=1e-9)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(3, 7)
    assert 0 < lo < 3 / 7 < hi < 1
    narrow, wide = wilson_interval(300, 1000), wilson_interval(3, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


@pytest.mark.parametrize("k,n", [(0, 10), (3, 17), (10, 10), (1, 1), (50, 200), (999, 1000)])
def test_clopper_pearson_matches_scipy_exact(k, n):
    ref = st.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(k, n) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert clopper_pearson(0, 0) == (0.0, 1.0)


def test_clopper_pearson_is_wider_than_wilson():
    for k, n in ((1, 20), (10, 20), (40, 50)):
        cp, w = clopper_pearson(k, n), wilson_interval(k, n)
        assert cp[0] <= w[0] and cp[1] >= w[1]


def test_metric_dicts():
    m = proportion(47, 1000)
    assert m["value"] == 0.047 and m["n"] == 1000 and m["ci95"] == list(wilson_interval(47, 1000))
    assert math.isnan(proportion(0, 0)["value"])
    json.dumps(m)
    vals = [0.1, 0.4, 0.35, 0.2, float("nan")]  # non-finite values are dropped
    mm = mean_metric(vals)
    lo, hi = st.t.interval(0.95, 3, loc=0.2625, scale=st.sem([0.1, 0.4, 0.35, 0.2]))
    assert mm["n"] == 4 and mm["value"] == pytest.approx(0.2625) and mm["ci95"] == pytest.approx([lo, hi])
    assert mean_metric([]) ["n"] == 0 and mean_metric([2.0])["ci95"] == [2.0, 2.0]
    assert scalar(3) == {"value": 3.0, "ci95": None, "n": None}


# ---------------------------------------------------------------- atomic writes
def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_writes_round_trip_and_leave_no_temp_files(tmp_path):
    atomic_write_text(tmp_path / "a" / "t.txt", "héllo")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "c.json", {"x": torch.tensor([1, 2]), "p": tmp_path, "v": torch.tensor(0.5)})
    atomic_torch_save(tmp_path / "d.pt", {"w": torch.arange(3)})
    assert (tmp_path / "a" / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2], "p": str(tmp_path), "v": 0.5}
    assert torch.equal(torch.load(tmp_path / "d.pt")["w"], torch.arange(3))
    assert _leftovers(tmp_path) == [] and _leftovers(tmp_path / "a") == []


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_json(target, {"ok": 1})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})  # fails while serialising
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the middle of a write

        def interrupted(p):
            p.write_text("half")
            raise KeyboardInterrupt

        from safedl.utils.io import _atomic

        _atomic(target, interrupted)
    assert target.read_bytes() == before and _leftovers(tmp_path) == []


def test_atomic_write_gives_normal_permissions(tmp_path):
    target = tmp_path / "r.txt"
    atomic_write_text(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    os.chmod(target, 0o640)
    atomic_write_text(target, "y")
    assert target.stat().st_mode & 0o777 == 0o640  # an existing file keeps its mode


# ---------------------------------------------------------------- hashes
def test_tensor_hash_is_stable_and_sensitive():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    h = tensor_hash(x)
    assert h == tensor_hash(x.clone()) == tensor_hash(x.t().contiguous().t())  # layout does not matter
    assert h == tensor_hash(x.t().t()) and len(h) == 64
    y = x.clone()
    y[1, 2] += 1e-6
    assert tensor_hash(y) != h                       # one value
    assert tensor_hash(x.reshape(4, 3)) != h         # same bytes, other shape
    assert tensor_hash(x.double()) != h              # same values, other dtype
    assert tensor_hash(x, torch.tensor([1])) != tensor_hash(x, torch.tensor([2]))
    assert tensor_hash(x.to(torch.bfloat16)) != tensor_hash(x.half())  # dtypes numpy lacks work too
    # Pinned value: a change here silently invalidates every cached stage and recorded split hash.
    assert tensor_hash(torch.arange(6.0).reshape(2, 3), torch.tensor([1, 2])) == \
        "095c7d8647874b8fb829c4b764d6fc1807cd178cf9ac0717d51a03a2604b4514"


def test_json_hash_ignores_key_order():
    assert json_hash({"a": 1, "b": [1, 2]}) == json_hash({"b": [1, 2], "a": 1})
    assert json_hash({"a": 1}) != json_hash({"a": 2})


def test_auroc_matches_pairwise_definition_with_ties():
    import torch

    from safedl.utils.stats import auroc

    g = torch.Generator().manual_seed(0)
    neg = torch.randint(0, 5, (40,), generator=g).float()
    pos = torch.randint(2, 8, (30,), generator=g).float()
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert abs(auroc(neg, pos) - float(pairs.mean())) < 1e-12
    assert auroc(neg, pos[:0]) != auroc(neg, pos[:0])  # nan


def test_robust_z_flags_the_outlier_that_a_plain_z_score_misses():
    import torch

    from safedl.utils.stats import robust_z

    v = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 30.0, 32.0])
    plain = (v - v.mean()) / v.std()
    assert float(plain.max()) < 2.0 and float(robust_z(v).max()) > 100
