"""Per-key stateful query detectors: is the stream of queries one API key sends an attack in progress?

Each detector keeps a bounded state per key and answers ``observe(key, x) -> QueryVerdict`` for every query batch;
``score`` is the suspicion in units of the detector's threshold (flagged exactly when ``score > 1``).
"""
from safedl.defenses.query.base import QueryDetector, QueryVerdict
from safedl.defenses.query.copycat import CopycatDetector
from safedl.defenses.query.monitor import ObservedModel
from safedl.defenses.query.ood_share import PixelSubspace
from safedl.defenses.query.prada import PRADA
from safedl.defenses.query.stateful import StatefulDetector
from safedl.defenses.query.sybil import SybilDetector
from safedl.defenses.query.volume import VolumeAnomaly

__all__ = ["QueryDetector", "QueryVerdict", "CopycatDetector", "ObservedModel", "PixelSubspace", "PRADA",
           "StatefulDetector", "SybilDetector", "VolumeAnomaly"]
