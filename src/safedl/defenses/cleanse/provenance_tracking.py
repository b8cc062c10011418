"""Data provenance: a signed manifest of sources and content hashes, tamper detection, and source-level filtering.

1. ``build_manifest(data, sources, key=...)``: every sample gets its source tag and the SHA-256 of its image bytes
   and label; the manifest is signed with HMAC-SHA256 (RFC 2104) under a secret key held by the data owner.
2. ``find_poison`` first verifies the signature (a forged manifest is reported and not trusted), then flags every
   sample whose hash no longer matches its manifest entry (tampered after signing) or that is missing from it.
3. Samples that passed the hash check can still be poison inserted by a source before signing. Following the
   provenance-based defense of Baracaldo et al. ("Mitigating Poisoning Attacks on Machine Learning Models: A Data
   Provenance Based Approach", AISec 2017; ART's ProvenanceDefense), for every source a model is trained without that
   source (``train_fn``) and compared on the trusted set with a model trained on everything; a source whose removal
   raises trusted accuracy by more than ``eps`` is flagged as a whole.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from typing import ClassVar, Any

import torch
from torch import nn

from safedl.data.dataset import Dataset
from safedl.defenses.cleanse._common import TrainFn
from safedl.defenses.cleanse.result import DetectionResult
from safedl.errors import ConfigError
from safedl.models.train import accuracy
from safedl.registry import register
from safedl.utils.validate import check_range


def sample_hashes(data: Dataset) -> list[str]:
    """SHA-256 of each sample's float32 image bytes and int64 label."""
    x = data.x.detach().cpu().contiguous().numpy()
    y = data.y.detach().cpu().numpy()
    return [hashlib.sha256(x[i].tobytes() + int(y[i]).to_bytes(8, "little", signed=True)).hexdigest()
            for i in range(len(y))]


def _sign(body: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def build_manifest(data: Dataset, sources: torch.Tensor | list[int], *, key: bytes) -> dict[str, Any]:
    """A signed manifest: per-sample source tag and SHA-256, plus an HMAC-SHA256 signature over both."""
    src = [int(s) for s in torch.as_tensor(sources).tolist()]
    if len(src) != len(data):
        raise ConfigError(f"provenance_tracking: {len(src)} source tags for {len(data)} samples")
    body = {"n": len(data), "sources": src, "sha256": sample_hashes(data)}
    return {**body, "signature": _sign(body, key)}


def verify_manifest(manifest: dict[str, Any], *, key: bytes) -> bool:
    body = {k: manifest.get(k) for k in ("n", "sources", "sha256")}
    return hmac.compare_digest(_sign(body, key), str(manifest.get("signature", "")))


@register("cleanser", "provenance_tracking")
class ProvenanceTracking:
    """Signed SHA-256 manifest (tamper detection) plus per-source removal tests on a trusted set."""

    inputs: ClassVar[frozenset[str]] = frozenset({"trusted", "train_fn", "provenance"})
    trusted_data: ClassVar[str] = "required"
    trusted_role: ClassVar[str] = "judges each contributor by accuracy without it"
    known_weak: ClassVar[dict[str, str]] = {
        "any": "the per-source test sees only poison that lowers trusted accuracy: a backdoor or mild random label "
               "noise does not (digits, 10% random flips all from one of 5 contributors: that contributor's removal "
               "gain -0.033, not flagged; 80% of class 3 flipped to 8: gain +0.044, flagged; "
               "tests/test_evaluate_defend_poisoning_protocols.py)",
    }

    def __init__(self, *, eps: float = 0.01, source_test: bool = True, min_source_size: int = 1):
        self.eps = check_range(self, "eps", eps, low=0.0, high=1.0)
        if not isinstance(source_test, bool):
            raise ConfigError(f"provenance_tracking: source_test={source_test!r} must be true or false")
        self.source_test = source_test
        self.min_source_size = check_range(self, "min_source_size", min_source_size, low=1, integer=True)

    def check_manifest(self, data: Dataset, *, manifest: dict[str, Any], key: bytes) -> DetectionResult:
        """The integrity check alone: verify the signature, then flag every sample whose hash no longer matches its
        manifest entry (altered after signing) or that the manifest does not know. ``info['sources']``: the tags."""
        n = len(data)
        tampered = torch.zeros(n, dtype=torch.bool)
        ok = verify_manifest(manifest, key=key)
        m = min(len(manifest.get("sha256", [])), n)
        sources = torch.full((n,), -1, dtype=torch.long)
        if ok:
            want, have = manifest["sha256"], sample_hashes(data)
            tampered[:m] = torch.tensor([want[i] != have[i] for i in range(m)], dtype=torch.bool)
            tampered[m:] = True  # samples the signed manifest does not know
            sources[:m] = torch.tensor(manifest["sources"][:m], dtype=torch.long)
        info = {"signature_valid": ok, "tampered": int(tampered.sum()), "sources": sources}
        return DetectionResult(tampered, tampered.float() * 2.0, info)

    def find_poison(self, data: Dataset, *, model: nn.Module | None = None, trusted: Dataset | None = None,
                    train_fn: TrainFn | None = None, device: str | torch.device = "cpu",
                    manifest: dict[str, Any] | None = None, key: bytes | None = None,
                    sources: torch.Tensor | None = None) -> DetectionResult:
        """``manifest`` + ``key``: the signed manifest (tamper check; its source tags are used). ``sources``: tags
        to use when there is no manifest. The source test needs ``trusted`` and ``train_fn``."""
        n = len(data)
        tampered = torch.zeros(n, dtype=torch.bool)
        info: dict[str, Any] = {}
        if manifest is not None:
            if key is None:
                raise ConfigError("provenance_tracking: a manifest needs the key it was signed with (key=...)")
            checked = self.check_manifest(data, manifest=manifest, key=key)
            tampered = checked.is_suspect
            info.update(signature_valid=checked.info["signature_valid"], tampered=checked.info["tampered"])
            if checked.info["signature_valid"]:
                sources = checked.info["sources"]
        if sources is None:
            sources = torch.zeros(n, dtype=torch.long)
        sources = torch.as_tensor(sources).long()
        score = tampered.float() * 2.0
        src_flag = torch.zeros(n, dtype=torch.bool)
        if self.source_test:
            if trusted is None or train_fn is None:
                raise ConfigError("provenance_tracking: source_test needs trusted= and train_fn=")
            src_flag, score, facts = self._source_test(data, sources, ~tampered, score, trusted, train_fn)
            info.update(facts)
        return DetectionResult(tampered | src_flag, score, info)

    def _source_test(self, data: Dataset, sources: torch.Tensor, keep: torch.Tensor, score: torch.Tensor,
                     trusted: Dataset, train_fn: TrainFn) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Baracaldo et al.'s test: retrain without each source; a source whose removal raises trusted accuracy by
        more than ``eps`` is flagged as a whole."""
        src_flag = torch.zeros(len(data), dtype=torch.bool)
        base = accuracy(train_fn(data.subset(keep)), trusted)
        per_source = []
        for s in torch.unique(sources[keep]).tolist():
            in_s = keep & (sources == s)
            if int(in_s.sum()) < self.min_source_size or bool((keep & ~in_s).sum() == 0):
                continue
            acc = accuracy(train_fn(data.subset(keep & ~in_s)), trusted)
            gain = acc - base
            per_source.append({"source": int(s), "n": int(in_s.sum()), "accuracy_without": acc, "gain": gain})
            score[in_s] = torch.maximum(score[in_s], torch.tensor(gain / max(self.eps, 1e-12)).clamp(-1, 1.5))
            if gain > self.eps:
                src_flag |= in_s
        return src_flag, score, {"base_accuracy": base, "per_source": per_source,
                                 "flagged_sources": [p["source"] for p in per_source if p["gain"] > self.eps]}
