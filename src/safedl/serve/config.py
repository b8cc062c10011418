"""The service's limits and knobs: one validated, frozen record (constructors store config only)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from safedl.serve.connection_limits import IPNetwork
from safedl.utils.validate import check_positive, check_range



MAX_WATERMARK_RATE = 0.005  #: issue 26: the watermark alters at most 0.5% of the answers


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Limits on untrusted input, batching, output tiers and the review queue.

    ``resize``: encoded images (PNG/JPEG/BMP/WebP) of another size are resized to the bundle's H x W (bilinear,
    antialiased) and converted to its channel count (gray <-> RGB, alpha dropped); with ``resize=False`` they are
    refused with 422 naming the expected shape. ``.npy`` arrays are never resized: their shape must match.
    """

    max_body_bytes: int = 8 * 2**20
    max_images: int = 64
    max_pixels: int = 4_000_000          # per image, checked from the header before decoding
    max_request_pixels: int = 16_000_000  # all images of one request together, checked from the headers too
    resize: bool = True
    max_batch: int = 64                  # images per forward pass
    max_wait_ms: float = 3.0             # how long a batch waits for more requests
    round_decimals: int = 2
    top_k: int = 3
    review_db: str | Path | None = None  # queue rejected inputs for review in this database (None: off)
    review_max_bytes: int = 100 * 2**20
    review_retention_days: float = 30.0
    # decode cost: pixels the image headers of one request declare, and a per-key pixel bucket
    key_pixels_per_s: float = 2_000_000.0
    key_pixel_burst: int = 32_000_000   # at least max_request_pixels is used, so the largest request can pass
    # bounded work before authentication, per client address (serve/unauth.py)
    unauth_rate_per_s: float = 1.0
    unauth_burst: int = 20
    unauth_total_rate_per_s: float = 20.0   # failures from all addresses together; over it, failing ones are slowed
    unauth_total_burst: int = 100
    unauth_flush_s: float = 5.0
    # the body must arrive within body_timeout_s and, after body_grace_s, at min_body_bytes_per_s on average
    body_timeout_s: float = 30.0
    body_grace_s: float = 5.0
    min_body_bytes_per_s: float = 16_384.0
    # decoded inputs kept per key by content hash (serve/input_cache.py); 0 bytes: off
    input_cache_bytes_per_key: int = 2 * 2**20
    input_cache_keys: int = 256
    # X-Forwarded-For is honoured only from these peers (a reverse proxy); empty: never
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # DAWN response watermark (defenses/ownership): HMAC key (secret: never in repr or logs) and share of answers
    watermark_key: bytes | None = field(default=None, repr=False)
    watermark_rate: float = 0.005
    # LastLayerMAD prediction poisoning of score-tier answers (defenses/postprocess/prediction_poisoning): L1 budget
    # (0: off) and the seed of its randomly initialised surrogate
    poisoning_epsilon: float = 0.0
    poisoning_seed: int = 0

    def __post_init__(self) -> None:
        who = "serve"
        check_positive(who, "max_body_bytes", self.max_body_bytes, integer=True)
        check_positive(who, "max_images", self.max_images, integer=True)
        check_positive(who, "max_pixels", self.max_pixels, integer=True)
        check_positive(who, "max_request_pixels", self.max_request_pixels, integer=True)
        check_positive(who, "max_batch", self.max_batch, integer=True)
        check_range(who, "max_wait_ms", self.max_wait_ms, low=0.0, high=100.0)
        check_range(who, "round_decimals", self.round_decimals, low=0, high=8, integer=True)
        check_range(who, "poisoning_epsilon", self.poisoning_epsilon, low=0.0, high=2.0)
        check_range(who, "watermark_rate", self.watermark_rate, low=0.0, low_inclusive=False, high=MAX_WATERMARK_RATE)
        check_positive(who, "top_k", self.top_k, integer=True)
        check_positive(who, "review_max_bytes", self.review_max_bytes, integer=True)
        check_positive(who, "review_retention_days", self.review_retention_days)
        check_range(who, "input_cache_bytes_per_key", self.input_cache_bytes_per_key, low=0, high=2**30,
                    integer=True)
        check_range(who, "input_cache_keys", self.input_cache_keys, low=1, high=1_000_000, integer=True)
        for name in ("key_pixel_burst", "unauth_burst", "unauth_total_burst"):
            check_positive(who, name, getattr(self, name), integer=True)
        for name in ("key_pixels_per_s", "unauth_rate_per_s", "unauth_total_rate_per_s", "unauth_flush_s",
                     "body_timeout_s", "body_grace_s", "min_body_bytes_per_s"):
            check_positive(who, name, getattr(self, name))
