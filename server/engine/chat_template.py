"""Render OpenAI chat messages into a prompt with the model's own Jinja chat template.

The template comes from the config (``chat_template``), else the GGUF metadata (``tokenizer.chat_template``),
else the ChatML fallback below, which is logged as a warning at start-up: a base model without a template
then still answers, in a format it may not know. Rendering runs in Jinja's sandbox, as Hugging Face does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.engine.errors import EngineError, EngineRequestError
from server.engine.protocol import TemplateFacts, TemplateSource

# ChatML: the most common template; SmolLM2 and Qwen use it. Its end marker doubles as a stop string.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_STOP = "<|im_end|>"

# Probes of what a template renders: names no real conversation uses, looked for in the rendered prompt.
_PROBE_TOOL = "llamasplit_probe_tool"
_PROBE_CALL = "llamasplit_probe_call"
_PROBE_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": _PROBE_TOOL,
            "description": "A probe.",
            "parameters": {"type": "object", "properties": {"probe": {"type": "string"}}, "required": ["probe"]},
        },
    }
]
_PROBE_CALL_MESSAGES: list[dict[str, Any]] = [
    {"role": "user", "content": "Probe."},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "probe0001", "type": "function", "function": {"name": _PROBE_CALL, "arguments": {"probe": "x"}}}
        ],
    },
    {"role": "tool", "tool_call_id": "probe0001", "content": "probed"},
]


class _TemplateRaised(Exception):
    """raise_exception() called by the template: the message is the template's own words."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # Hugging Face's tojson: no HTML escaping (Jinja's built-in escapes <, >, &, ').
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template plus where it came from and the stop strings it implies."""

    def __init__(self, source_text: str, source: TemplateSource, *, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, loader=jinja2.BaseLoader())
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source_text)
        self.text = source_text
        self.source: TemplateSource = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        # Without a model template the ChatML end marker is plain text to the model; stop on it.
        self.stop_strings: tuple[str, ...] = (CHATML_STOP,) if source == "fallback" else ()

    @classmethod
    def choose(
        cls, configured: str | None, gguf_template: str | None, *, bos_token: str, eos_token: str
    ) -> ChatTemplate:
        """The configured template (inline or a file path), else the GGUF's, else ChatML."""
        if configured is not None:
            text = _read_configured(configured)
            try:
                return cls(text, "config", bos_token=bos_token, eos_token=eos_token)
            except jinja2.TemplateSyntaxError as exc:
                raise EngineError(f"chat_template does not compile: {exc.message} (line {exc.lineno})") from exc
        if gguf_template:
            try:
                return cls(gguf_template, "gguf", bos_token=bos_token, eos_token=eos_token)
            except jinja2.TemplateSyntaxError:
                pass  # a GGUF template Jinja cannot parse: use the fallback, which the registry logs
        return cls(CHATML_TEMPLATE, "fallback", bos_token=bos_token, eos_token=eos_token)

    @functools.cached_property
    def facts(self) -> TemplateFacts:
        """What this template renders, found by rendering probe conversations (as minja's capability probes do)."""

        def renders(name: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
            try:
                return name in self.render(messages, tools=tools)
            except EngineRequestError:  # the template refuses the probe: it cannot take such conversations
                return False

        return TemplateFacts(
            source=self.source,
            text=self.text,
            renders_tools=renders(_PROBE_TOOL, [{"role": "user", "content": "Probe."}], _PROBE_TOOLS),
            renders_tool_calls=renders(_PROBE_CALL, _PROBE_CALL_MESSAGES, _PROBE_TOOLS),
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt text; a template that refuses the conversation is the client's 400, naming messages."""
        # Templates test `tools is defined` or `tools is not none`: without tools the variable stays undefined.
        extra: dict[str, Any] = {"tools": list(tools)} if tools is not None else {}
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except _TemplateRaised as exc:
            raise EngineRequestError(
                f"the model's chat template refused the messages: {exc}", param="messages"
            ) from exc
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise EngineRequestError(
                f"the model's chat template could not render these messages ({type(exc).__name__}: {exc}); "
                "check the roles and their order",
                param="messages",
            ) from exc


def _read_configured(value: str) -> str:
    # A value with template syntax is the template itself; anything else is a path to one.
    if "{%" in value or "{{" in value:
        return value
    path = Path(value)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineError(f"chat_template {value!r} is neither a Jinja template nor a readable file: {exc}") from exc
