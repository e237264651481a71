"""The service's JSON shapes as Pydantic models: FastAPI validates the responses against them and
/openapi.json (and /docs) shows every request body and response. Import only with the [serve] extra."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class Error(BaseModel):
    error: str = Field(description="What went wrong and what to do, in one line")


class TopK(BaseModel):
    label: str
    probability: float


class ImagePrediction(BaseModel):
    image: str = Field(description="The uploaded file's name, or 'body' for a raw image body")
    label: str = Field(description="The most likely class, or 'unknown' when rejected")
    top_k: list[TopK]
    distance: float = Field(description="Distance to the nearest class prototype (the rejection distance)")


class PredictMs(BaseModel):
    decode: float
    embed: float
    head: float
    total: float


class PredictResponse(BaseModel):
    predictions: list[ImagePrediction]
    ms: PredictMs


class ClassShots(BaseModel):
    label: str
    shots: int


class ClassesResponse(BaseModel):
    classes: list[ClassShots]
    head: str = Field(description="The head kind fitted on the classes")


class EnrollMs(BaseModel):
    enroll: float


class ConfusedPair(BaseModel):
    a: str
    b: str
    confusion: float = Field(description="Estimated share of a's photos taken for b (and b's for a)")


class ShotFlag(BaseModel):
    label: str
    index: int = Field(description="The shot's position in its class, from 0")
    flag: str = Field(description="outlier (probably another object or a bad frame) | duplicate (of shot `of`)")
    distance: float
    limit: float | None = None
    of: int | None = None


class ClassAdvice(BaseModel):
    label: str
    shots: int
    advice: list[str] = Field(description="What to do, in words")


class Review(BaseModel):
    pairs: list[ConfusedPair] = Field(description="Classes likely to be confused, highest first")
    shots: list[ShotFlag]
    classes: list[ClassAdvice]


class EnrollResponse(BaseModel):
    label: str
    shots: int = Field(description="The class's shots after this request")
    classes: int = Field(description="Classes enrolled in the store")
    ms: EnrollMs
    feedback: Review = Field(description="What this enrollment changed: confusions with it, flagged shots, advice")


class ClassLimit(BaseModel):
    limit: float | None = Field(description="Farther than this from the class: unknown (None: never)")
    source: str = Field(alias="from", description="own (set by a person) | prior | support set")


class LimitsResponse(BaseModel):
    limits: dict[str, ClassLimit]


class Negative(BaseModel):
    id: str
    note: str = Field(description="The class it was wrongly given ('' for none of them)")
    image: str = Field(description="The kept image's name in the store ('' if not kept)")


class NegativesResponse(BaseModel):
    negatives: list[Negative]


class CorrectionResponse(BaseModel):
    correction: str = Field(description="is | not | none")
    label: str | None
    shots: int | None = Field(None, description="is: the class's shots after this correction")
    negatives: list[str] | None = Field(None, description="not / none: the negative examples' ids")
    total_negatives: int | None = None


class ForgetResponse(BaseModel):
    forgotten: str
    classes: int


class ModelResponse(BaseModel):
    name: str
    backbone: str | None
    algorithm: str | None
    pretrained: dict = Field(default_factory=dict, description="Where the starting weights came from (empty: from scratch)")
    model_sha256: str
    input: dict
    embedding_dim: int
    l2_normalized: bool
    head: dict
    variant: str
    backend: dict
    device: dict
    edgemeta: str
    classes: int
    uptime_s: float
    unknown_auto: dict = Field(default_factory=dict, description="How unknown=auto decides with this bundle")


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


# Request bodies the routes read themselves (multipart with limits counted as they arrive, or one raw
# image), described for the OpenAPI document.
IMAGES_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "images": {"type": "array", "items": {"type": "string", "format": "binary"},
                           "description": "one or more images (JPEG, PNG, WebP, BMP, GIF)"}}, "required": ["images"]}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": Error} for status in (400, 401, 403, 404, 409, 413, 503, 507)}
