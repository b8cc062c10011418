"""Response bodies of the service (pydantic), so the OpenAPI document describes every answer."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field


class TopClass(BaseModel):
    label: int
    class_name: str
    probability: float


class ImageResult(BaseModel):
    index: int = Field(description="position of the image in the request")
    label: Optional[int] = Field(description="predicted label; null when the image was rejected")
    class_name: Optional[str] = None
    rejected: bool
    reason: Optional[str] = Field(None, description='"detector:<name>" or "abstain:<certifier>" when rejected')
    probabilities: Optional[list[Optional[float]]] = Field(None, description="per class (tiers full and rounded)")
    top_k: Optional[list[TopClass]] = Field(None, description="the k most likely classes (tier topk)")
    detector_scores: Optional[dict[str, Optional[float]]] = Field(None, description="per detector (tier full)")
    input_sha256: str


class PredictResponse(BaseModel):
    request_id: str
    bundle_version: str
    tier: str
    results: list[ImageResult]


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    bundle_version: str
    problems: list[str]


class ModelInfo(BaseModel):
    bundle_version: str
    input_shape: list[int]
    class_names: list[str]
    manifest: dict
