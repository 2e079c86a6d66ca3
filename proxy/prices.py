"""Model prices as a config writes them: the top-level ``prices:`` table (checked when the config loads) and
the metering plugin's own ``prices:`` use the same shape."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class PriceSpec(BaseModel):
    """One model's price, per million tokens, as written in YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(..., ge=0, le=1e6, description="Price of a million prompt tokens.")
    cached_input: float | None = Field(
        None, ge=0, le=1e6, description="Price of a million prompt tokens served from the provider's cache; default: input."
    )
    output: float = Field(0.0, ge=0, le=1e6, description="Price of a million completion tokens (reasoning tokens included).")
    as_of: str | None = Field(None, max_length=32, description="When the price was taken (informational).")

    @model_validator(mode="before")
    @classmethod
    def _dates(cls, data: Any) -> Any:
        # YAML turns an unquoted 2025-01-31 into a date
        if isinstance(data, dict) and data.get("as_of") is not None and not isinstance(data["as_of"], str):
            data = {**data, "as_of": str(data["as_of"])}
        return data


def parse_table(data: Mapping[str, Any], where: str) -> dict[str, PriceSpec]:
    """Validate a ``{model: {input, cached_input, output}}`` mapping; errors name the model (under ``where``,
    when given)."""
    out: dict[str, PriceSpec] = {}
    for model, spec in data.items():
        label = f"{where}.{model}" if where else str(model)
        if not isinstance(spec, Mapping):
            raise ValueError(f"{label}: expected a mapping with input, cached_input, output")
        try:
            out[str(model)] = PriceSpec.model_validate(dict(spec))
        except ValidationError as e:
            errs = "; ".join(
                f"{'.'.join(map(str, er['loc'])) or '<root>'}: {'unknown field' if er['type'] == 'extra_forbidden' else er['msg']}"
                for er in e.errors()
            )
            raise ValueError(f"{label}: {errs}") from None
    return out
