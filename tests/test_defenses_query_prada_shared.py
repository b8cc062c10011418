"""PRADA (Juuti et al., EuroS&P 2019) with its per-key state shared through the query history (defenses/query/
history.py, serve/stores/history.py on SQLite and PostgreSQL): a synthetic-query stream spread round-robin over two
replicas is flagged at the same query number as on one replica; with per-process state it is flagged later."""
from __future__ import annotations

import pytest
import torch

from safedl.defenses.query import PRADA
from safedl.errors import ConfigError
from safedl.serve.stores.history import DatabaseHistory

CHUNK = 8
PARAMS = dict(min_queries=40, window=100, max_growing=300, delta=0.93)


@pytest.fixture(scope="module")
def stream(digits_splits):
    """Benign test images, then Jacobian-augmentation-like synthetic queries: 10 seeds, then the seeds moved by
    fixed-size sign steps (seed 0), whose minimum distances are nearly constant (PRADA's signal)."""
    g = torch.Generator().manual_seed(0)
    seeds = digits_splits.test.x[:10]
    steps = [(seeds[i % 10] + 0.05 * torch.randn(seeds.shape[1:], generator=g).sign()).clamp(0, 1)
             for i in range(120)]
    return torch.cat([digits_splits.test.x[10:130], seeds, torch.stack(steps)])


def first_flag(replicas: list[PRADA], stream: torch.Tensor) -> int | None:
    for b, i in enumerate(range(0, len(stream), CHUNK)):
        batch = stream[i:i + CHUNK]
        v = replicas[b % len(replicas)].observe("thief", batch)
        if v.flagged:
            return i + len(batch)  # PRADA judges per batch: the stream position of the batch's last query
    return None


def test_a_spread_synthetic_stream_is_flagged_as_on_one_replica(db_url, stream):
    one = first_flag([PRADA(**PARAMS)], stream)
    assert one is not None and one > 120  # flagged in the synthetic part, not in the benign prefix
    apart = first_flag([PRADA(**PARAMS) for _ in range(2)], stream)
    assert apart is None or apart > one  # per-process state: each replica sees half the stream
    stores = [DatabaseHistory(db_url) for _ in range(2)]  # two replicas: own engines, own writer ids
    replicas = [PRADA(**PARAMS, shared=s) for s in stores]
    assert first_flag(replicas, stream) == one, (one, apart)
    v = replicas[1].observe("thief", stream[:1])
    assert v.n_seen == -(-one // CHUNK) * CHUNK + 1  # counted over both replicas
    for s in stores:
        s.close()


def test_a_shared_prada_needs_a_shared_history():
    with pytest.raises(ConfigError, match="SharedHistory"):
        PRADA(shared=object())


def test_the_monitor_config_shares_prada_only_when_asked(tmp_path):
    from safedl.serve.monitor.build import build_detectors
    from safedl.serve.monitor.config import MonitorConfig

    history = DatabaseHistory(str(tmp_path / "audit.db"))
    for store, expect in (("database", history), ("memory", None)):
        cfg = MonitorConfig(detectors={"stateful": {"enabled": False}, "copycat": {"enabled": False},
                                       "sybil": {"enabled": False},
                                       "prada": {"delta": 0.9, "history_store": store}})
        assert build_detectors(cfg, num_classes=10, shared=history)["prada"].shared is expect
    history.close()
