"""Request and response schemas of the HTTP API (pydantic; they also drive ``/docs``).

Requests reject unknown fields. Server limits (the token bound, the longest deadline)
are passed as validation context (``{"max_new_tokens": int, "max_grounding_tokens": int,
"max_deadline_s": float, "upload": bool}``), so every 422 comes out of the same
validator with a field location.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from d2vlm_ray.config.schema import DecodeSettings

_EVI = "<evi>"
_MAX_TEXT_CHARS = 4000

Span = tuple[float, float]


def _limit(info: ValidationInfo, name: str) -> Any:
    return (info.context or {}).get(name)


OUTPUT_WARNINGS_DOC = (
    "What the model's output got wrong that its spans do not show, e.g. a Grounded-VideoLLM "
    "temporal token that formed no span; empty when well formed."
)


class DecodeOptions(BaseModel):
    """Per-request decoding options; unset bounds take the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(None, ge=1, description="Bound on generated answer tokens.")
    max_grounding_tokens: int | None = Field(None, ge=1, description="Bound on grounding tokens (n x <evi>, </evi>).")
    deadline_s: float | None = Field(None, gt=0, description="Seconds before the request fails with 504.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int = 0

    @field_validator("max_new_tokens", "max_grounding_tokens")
    @classmethod
    def _within_server_bound(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = _limit(info, str(info.field_name))
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"at most {limit} on this server")
        return value

    @field_validator("deadline_s")
    @classmethod
    def _within_max_deadline(cls, value: float | None, info: ValidationInfo) -> float | None:
        limit = _limit(info, "max_deadline_s")
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"at most {limit} s on this server")
        return value

    def settings(self, max_new_tokens: int) -> DecodeSettings:
        """Decoding settings with ``max_new_tokens`` as the bound."""
        return DecodeSettings(
            max_new_tokens=max_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )


class _VideoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    video: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description=(
            "A path under the server's media roots, or an fsspec URL of an allowed scheme. "
            "Required with a JSON body; omit it when uploading the file (multipart)."
        ),
    )
    src_spans_s: list[Span] | None = Field(
        None, description="Question-side spans [[start_s, end_s], ...], one per <evi> in the text."
    )
    options: DecodeOptions = Field(default_factory=DecodeOptions)

    @field_validator("src_spans_s")
    @classmethod
    def _spans_valid(cls, spans: list[Span] | None) -> list[Span] | None:
        for start_s, end_s in spans or []:
            if not (math.isfinite(start_s) and math.isfinite(end_s)):
                raise ValueError("spans must be finite")
            if start_s < 0 or end_s < start_s:
                raise ValueError(f"span [{start_s}, {end_s}] needs 0 <= start_s <= end_s")
        return spans

    @staticmethod
    def _check_text(text: str) -> str:
        if not text.strip():
            raise ValueError("must not be empty")
        if len(text) > _MAX_TEXT_CHARS:
            raise ValueError(f"at most {_MAX_TEXT_CHARS} characters")
        return text

    def _check_common(self, text: str, field: str, info: ValidationInfo) -> None:
        upload = bool(_limit(info, "upload"))
        if upload and self.video is not None:
            raise ValueError("video: give either a video reference or an uploaded file, not both")
        if not upload and self.video is None:
            raise ValueError("video: field required (a path, a URL, or a multipart upload)")
        n_evi = text.count(_EVI)
        n_spans = len(self.src_spans_s or [])
        if n_evi != n_spans:
            raise ValueError(f"src_spans_s: {n_spans} spans for {n_evi} {_EVI} in {field}")


class GroundRequest(_VideoRequest):
    """``POST /v1/ground``: where in the video is the evidence for this query?"""

    query: str = Field(..., description="The question or query to ground.")

    @field_validator("query")
    @classmethod
    def _query_text(cls, text: str) -> str:
        return cls._check_text(text)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> GroundRequest:
        self._check_common(self.query, "query", info)
        return self


class AnswerRequest(_VideoRequest):
    """``POST /v1/answer``: ground, then answer with interleaved evidence."""

    question: str = Field(..., description="The question to answer.")
    stream: bool = Field(False, description="Send answer tokens as server-sent events.")

    @field_validator("question")
    @classmethod
    def _question_text(cls, text: str) -> str:
        return cls._check_text(text)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> AnswerRequest:
        self._check_common(self.question, "question", info)
        return self


class GroundResponse(BaseModel):
    """Grounded spans with their per-frame scores."""

    spans_s: list[Span] = Field(description="One [start_s, end_s] per evidence token.")
    scores: list[list[float]] = Field(description="Per evidence token, the probability of every sampled frame.")
    timestamps_s: list[float] = Field(description="Presentation time of every sampled frame.")
    duration_s: float
    text: str = Field(description='The grounding part as text, e.g. "2 - 4 </evi>".')
    complete: bool = Field(description="False if the grounding hit its token bound before </evi>.")
    cache: Literal["hit", "miss"] = Field(description="Whether the video's features came from the cache.")
    timings_ms: dict[str, float]
    warnings: list[str] = Field(
        default_factory=list,
        description="What decoding the video lost or doubted (frames that failed, suspect metadata); empty when clean.",
    )
    output_warnings: list[str] = Field(default_factory=list, description=OUTPUT_WARNINGS_DOC)
    missing_timestamps_s: list[float] = Field(
        default_factory=list, description="Presentation times of sampled frames that could not be decoded."
    )


class EvidenceRef(BaseModel):
    """One evidence span cited in the answer, and where it appears in the answer text."""

    span_s: Span
    text_ref: str = Field(description='The "s - e" text the span became.')
    char_start: int = Field(description="answer[char_start:char_end] == text_ref")
    char_end: int


class AnswerResponse(BaseModel):
    """The answer with its evidence."""

    answer: str = Field(description='The answer part, evidence shown as "s - e".')
    evidence: list[EvidenceRef]
    response: str = Field(description="The whole response (grounding part, </evi>, answer).")
    truncated: bool = Field(description="True if the answer hit its token bound.")
    grounding: GroundResponse
    timings_ms: dict[str, float]
    warnings: list[str] = Field(
        default_factory=list,
        description="What decoding the video lost or doubted (frames that failed, suspect metadata); empty when clean.",
    )
    output_warnings: list[str] = Field(default_factory=list, description=OUTPUT_WARNINGS_DOC)
    missing_timestamps_s: list[float] = Field(
        default_factory=list, description="Presentation times of sampled frames that could not be decoded."
    )


class ErrorResponse(BaseModel):
    """Every error body."""

    detail: str | list[dict[str, Any]]
    reason: str


class HealthResponse(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok"]


class ModelInfo(BaseModel):
    """One served model."""

    id: str
    preset: str
    family: str = Field("d2vlm", description="Model family: d2vlm or grounded_videollm.")
    encoder_id: str
    dtype: str
    fps: float
    max_frames: int | None
    max_video_duration_s: float | None
    max_new_tokens: int
    max_grounding_tokens: int


class ModelsResponse(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelInfo]
