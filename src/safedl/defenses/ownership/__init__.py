"""Ownership proofs for stolen models: a keyed response watermark (DAWN) and its statistical verification."""
from safedl.defenses.ownership.dawn import ResponseWatermark, WatermarkedModel
from safedl.defenses.ownership.verify import OwnershipVerdict, verify_ownership

__all__ = ["ResponseWatermark", "WatermarkedModel", "OwnershipVerdict", "verify_ownership"]
