"""The request-field policy: every field OpenAI defines for completions, chat completions and
embeddings is accepted; each one is implemented, ignored (it changes nothing about the answer
this server gives), or refused with a 400 naming it (ignoring it would give a wrong answer).
The README's "Request fields" table is the full list.

Fields nobody defines are ignored, as vLLM does (its request models allow extra fields and
log their names), so that a client written for another server still works; hpllm also names
them in a response header, since a typo ("max_token") would otherwise pass unnoticed.
Ignored fields present in a request (not null) are named in the response headers and logged
once per request:

    x-hpllm-ignored-fields: metadata, store, max_token    every field that was not applied
    x-hpllm-unknown-fields: max_token                     those of them nobody defines

Only the top level of a body is lenient: nested objects (messages, stream_options,
response_format, ...) stay strict, and a wrongly typed value of any known field is a 400.
"""

from __future__ import annotations

import logging

log = logging.getLogger("hpllm.serve")

IGNORED_HEADER, UNKNOWN_HEADER = "x-hpllm-ignored-fields", "x-hpllm-unknown-fields"
_SCOPE_KEY = "hpllm.ignored_fields"  # (ignored, unknown) for this request, in the ASGI scope

# OpenAI fields that change nothing here: bookkeeping for OpenAI's platform (metadata, store,
# service tiers, abuse monitoring, its prompt cache), controls of reasoning models, and a
# predicted output (a latency hint: the answer is the model's own either way).
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier",
           "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
           "reasoning_effort", "verbosity", "prediction")

# OpenAI fields that ask for something this server cannot do: ignoring them would answer a
# different question than the one asked.
REFUSED = {
    "audio": "audio output is not supported (this server generates text only)",
    "moderation": "moderation is not supported; ignoring it would return unmoderated output",
    "web_search_options": "web search is not supported",
    "functions": "functions (deprecated by OpenAI) is not supported; use tools",
    "function_call": "function_call (deprecated by OpenAI) is not supported; use tool_choice",
}


def refused(req) -> tuple[str, str] | None:
    """(field, why) of the first field of this request that must be refused, or None."""
    for name, why in REFUSED.items():
        if getattr(req, name, None) not in (None, []):  # functions: [] asks for nothing
            return name, why
    modalities = getattr(req, "modalities", None)
    if modalities is not None and modalities != ["text"]:
        return "modalities", 'only text output is supported: modalities must be ["text"]'
    return None


def ignored(req) -> tuple[list[str], list[str]]:
    """(every field present in the request that is not applied, those of them nobody
    defines)."""
    names = [f for f in IGNORED if getattr(req, f, None) is not None]
    if getattr(req, "modalities", None) == ["text"]:
        names.append("modalities")  # text is what it generates anyway
    options = getattr(req, "stream_options", None)
    if options is not None and options.include_obfuscation is not None:
        names.append("stream_options.include_obfuscation")
    unknown = sorted(req.model_extra or {})
    return names + unknown, unknown


def listing(names: list[str], most: int = 16) -> str:
    """The names as one header-safe line: ASCII with escapes (a field name is any JSON
    string, line breaks included), at most `most` of them."""
    shown = ", ".join(n.encode("unicode_escape").decode("ascii") for n in names[:most])
    return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def note_ignored(request, req) -> None:
    """Log this request's ignored fields and keep them for the response headers."""
    names, unknown = ignored(req)
    if not names:
        return
    shown, shown_unknown = listing(names), listing(unknown)
    request.scope[_SCOPE_KEY] = (shown, shown_unknown)
    message = f"{request.url.path}: ignored fields {shown}"
    if unknown:
        log.warning("%s (%s: defined by no API)", message, shown_unknown)
    else:
        log.info("%s", message)


class IgnoredFieldsHeader:
    """ASGI middleware: adds the ignored-field headers to the response of a request whose
    route noted them (streamed responses included, since the headers go first)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            noted = scope.get(_SCOPE_KEY)
            if message["type"] == "http.response.start" and noted:
                names, unknown = noted
                extra = [(IGNORED_HEADER.encode(), names.encode())]
                if unknown:
                    extra.append((UNKNOWN_HEADER.encode(), unknown.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
