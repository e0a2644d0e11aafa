"""What goes in and out of the JSON API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from db.schema import Verdict


class ReviewIn(BaseModel):
    """A review as posted: a verdict, an optional diagnosis (one of the model's classes), a note."""

    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    diagnosis: str | None = None
    note: str = Field(default="", max_length=10_000)
