"""Request bodies of `lemoe serve`, with their bounds: a bad field is a 400 naming it (app.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data import DataError, EditRecord


class Limits(BaseModel):
    """What one request may ask for; set from the command line."""

    max_tokens: int = 512
    max_prompts: int = 16
    max_edits: int = 100
    max_body_bytes: int = 1 << 20


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, n=1, ...)

    model: str | None = None
    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: Literal[1] = 1

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        return stops

    def stops(self) -> list[str]:
        return list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> str | list[str]:
        if (isinstance(value, str) and not value) or (isinstance(value, list) and (not value or not all(value))):
            raise ValueError("prompts must be non-empty strings")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class EditBatch(BaseModel):
    """A batch of edits in lemoe's JSON format (`EditRecord.to_dict`): one new expert."""

    edits: list[dict[str, Any]] = Field(min_length=1)

    def records(self) -> list[EditRecord]:
        records = []
        for i, item in enumerate(self.edits):
            try:
                records.append(EditRecord.from_dict(item, where=f"edits[{i}]"))
            except DataError as err:
                raise ValueError(str(err)) from None
        return records


class Rollback(BaseModel):
    batches: int = Field(ge=0)
