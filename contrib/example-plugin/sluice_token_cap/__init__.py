"""token_cap: give every completion request a ceiling on the tokens it may generate.

A third-party plugin, packaged on its own: it imports only ``proxy`` (Sluice's
public face) and reaches Sluice through the ``sluice.plugins`` entry point.

    chain:
      - token_cap: {max_tokens: 1024, default_max_tokens: 256, action: clamp}
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from proxy import Context, Plugin, PluginConfig, ProxyError, hookimpl

FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


class TokenCap(Plugin):
    name = "token_cap"
    kind = "guard"

    class Config(PluginConfig):
        max_tokens: int = Field(..., ge=1, le=10_000_000, description="The most tokens a request may ask the model to generate.")
        default_max_tokens: int | None = Field(
            None, ge=1, le=10_000_000, description="Set on requests that ask for no limit; default: leave them alone."
        )
        action: Literal["clamp", "reject"] = Field(
            "clamp", description="'clamp' lowers a larger ask to max_tokens; 'reject' answers 400."
        )

        @model_validator(mode="after")
        def _default_within_cap(self) -> "TokenCap.Config":
            if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens:
                raise ValueError("default_max_tokens must not exceed max_tokens")
            return self

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if ctx.answered or not ctx.body_is_json:
            return
        body = ctx.body
        if "messages" not in body and "prompt" not in body and "input" not in body:
            return  # not a generation request
        cfg = self.config
        asked = {f: body[f] for f in FIELDS if isinstance(body.get(f), int)}
        changed = False
        for field, value in asked.items():
            if value > cfg.max_tokens:
                if cfg.action == "reject":
                    raise ProxyError(
                        400, f"{field} may be at most {cfg.max_tokens} on this route.", param=field, code="max_tokens_exceeded"
                    )
                body[field] = cfg.max_tokens
                changed = True
        if not asked and cfg.default_max_tokens is not None:
            field = "max_output_tokens" if "input" in body and "messages" not in body else (
                "max_tokens" if "prompt" in body else "max_completion_tokens"
            )
            body[field] = cfg.default_max_tokens
            changed = True
        if changed:
            ctx.body = body
            ctx.annotations["token_cap"] = {"capped": True}


@hookimpl
def register_plugins(register):
    register(TokenCap)
