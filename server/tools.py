"""Tool calls in chat completions: the call syntax a chat template teaches, the grammar that holds the model to
it, and the parser that turns the generated text back into OpenAI ``tool_calls``, whole or as stream deltas.

The syntax is read from the template text in the order llama.cpp's common/chat.cpp used before its automatic
parser: Hermes 2 Pro / Qwen 2.5 (``<tool_call>{json}</tool_call>``), Llama 3.x (one ``{"name", "parameters"}``
object; its template has an ``ipython`` role), Mistral Nemo (``[TOOL_CALLS][{...}]``), and, for any other
template that renders ``tools``, llama.cpp's generic JSON reply (``{"tool_calls": [...]}`` or
``{"response": "..."}``). A template that never writes the tools it is given into the prompt cannot tell the
model about them: such a request is refused (docs/SERVER.md, "Tool calls").

``tool_choice`` "auto" gets a lazy grammar: text is free until a trigger pattern matches the generated text
(the start of a call), then the grammar holds the call to the tools' schemas. "required" and a named function
hold from the first token. The generic format holds from the first token always (its reply is JSON).
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from server.engine import FinishReason as EngineFinishReason
from server.engine import OutputConstraint
from server.engine.protocol import TemplateFacts
from server.errors import InvalidRequestError
from server.protocol import (
    AssistantReply,
    ChatCompletionRequest,
    FinishReason,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
)

FormatName = Literal["hermes", "llama3", "mistral", "generic"]

# The generic format's instruction, llama.cpp's words (common_chat_params_init_generic).
GENERIC_INSTRUCTION = (
    "Respond in JSON format, either with `tool_call` (a request to call tools) or with `response` reply to "
    "the user's request"
)
# Whitespace the grammar allows between the parts of a call: bounded, so that a model cannot run away in it.
_WS_RULE = "ws ::= [ \\t\\n]{0,4}"
_WS_REGEX = "[ \\t\\n]{0,4}"
_MISTRAL_ID_ALPHABET = string.ascii_letters + string.digits


def detect_format(template_text: str) -> FormatName:
    """The call syntax a chat template teaches, by the marks common/chat.cpp looked for, in its order."""
    if "<tool_call>" in template_text:
        return "hermes"
    if "<|start_header_id|>ipython<|end_header_id|>" in template_text:
        return "llama3"
    if "[TOOL_CALLS]" in template_text:
        return "mistral"
    return "generic"


# --- the plan of one request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    """How one request's tools are rendered, constrained and parsed."""

    format: FormatName
    tools: list[dict[str, Any]]  # the OpenAI tool objects, for the template's ``tools``
    constraint: OutputConstraint | None  # None when tool_choice is "none": the reply is plain text
    template_drops_calls: bool  # the template leaves an assistant message's tool_calls out of the prompt

    @property
    def calls_expected(self) -> bool:
        return self.constraint is not None

    def messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation (``call_for_template``'s calls) for the template: calls spelled out where the template
        would drop them, and the generic format's instruction in the system message."""
        out = []
        for message in messages:
            calls = message.get("tool_calls")
            if calls and self.template_drops_calls:
                # The template would drop the calls: the model would never see what it asked for.
                message = {
                    **message,
                    "content": f"{message.get('content') or ''}{call_history_text(self.format, calls)}",
                }
            out.append(message)
        if self.format == "generic" and self.calls_expected:
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{GENERIC_INSTRUCTION}"}
            else:
                out.insert(0, {"role": "system", "content": GENERIC_INSTRUCTION})
        return out

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.format, self.calls_expected)


def plan_tools(request: ChatCompletionRequest, template: TemplateFacts, model: str) -> ToolPlan | None:
    """The plan for ``request``'s tools (None without tools); a template that cannot carry them is a 400."""
    if not request.tools:
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in request.tools]
    choice_value = request.tool_choice if request.tool_choice is not None else "auto"
    choice = choice_value.function.name if isinstance(choice_value, NamedToolChoice) else choice_value
    fmt = detect_format(template.text)
    drops_calls = not template.renders_tool_calls
    if choice == "none":
        return ToolPlan(fmt, tools, None, drops_calls)
    if not template.renders_tools:
        where = {"config": "configured", "gguf": "GGUF's", "fallback": "fallback (ChatML)"}[template.source]
        raise InvalidRequestError(
            f"the model {model!r} cannot call tools: its {where} chat template never writes the tools it is given "
            "into the prompt, so the model would not know them; start the model with a chat_template that "
            'renders `tools` (docs/SERVER.md, "Tool calls"), or send tool_choice "none"',
            param="tools",
        )
    for param in ("response_format", "grammar", "json_schema"):
        value = getattr(request, param, None)
        if value is not None and getattr(value, "type", None) != "text":
            raise InvalidRequestError(
                f"{param} cannot be combined with tools: the tool calls have their own grammar; "
                'send tool_choice "none" to constrain a plain reply',
                param=param,
            )
    chosen = [t for t in request.tools if choice in ("auto", "required") or t.function.name == choice]
    schemas = [(t.function.name, t.function.parameters) for t in chosen]
    # Llama 3.x's template takes one call per message (it raises on more).
    parallel = request.parallel_tool_calls is not False and fmt != "llama3"
    gbnf = build_grammar(fmt, schemas, parallel=parallel, required=choice != "auto")
    lazy = choice == "auto" and fmt != "generic"
    constraint = OutputConstraint(gbnf=gbnf, triggers=(_TRIGGERS[fmt],) if lazy else (), markers=_MARKERS[fmt])
    return ToolPlan(fmt, tools, constraint, drops_calls)


def call_for_template(call: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as templates take it: they write arguments with ``| tojson``, so they expect an
    object where OpenAI sends a JSON string (vLLM converts them the same way)."""
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    return {**call, "function": function}


def call_history_text(fmt: FormatName, calls: Sequence[Mapping[str, Any]]) -> str:
    """Earlier calls in the format's own syntax, for templates that drop an assistant message's tool_calls."""
    objects = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in calls]
    if fmt == "hermes":
        return "".join(f"\n<tool_call>\n{json.dumps(o, ensure_ascii=False)}\n</tool_call>" for o in objects)
    if fmt == "mistral":
        return "[TOOL_CALLS]" + json.dumps(
            [{**o, "id": c.get("id", "")} for o, c in zip(objects, calls, strict=True)], ensure_ascii=False
        )
    if fmt == "llama3":
        return json.dumps({"name": objects[0]["name"], "parameters": objects[0]["arguments"]}, ensure_ascii=False)
    return json.dumps({"tool_calls": objects}, ensure_ascii=False)


# --- grammars --------------------------------------------------------------------------------------------------

# The key that holds a call's arguments, per format.
_ARGUMENTS_KEY: dict[FormatName, str] = {
    "hermes": "arguments",
    "llama3": "parameters",
    "mistral": "arguments",
    "generic": "arguments",
}
_MARKERS: dict[FormatName, tuple[str, ...]] = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3": (),
    "mistral": ("[TOOL_CALLS]",),
    "generic": (),
}


def _optional_chain(atoms: Sequence[str]) -> str:
    """A regex that matches any prefix of the concatenated atoms: a(?:b(?:c)?)?."""
    out = ""
    for atom in reversed(atoms):
        out = f"{atom}(?:{out})?" if out else atom
    return f"(?:{out})?"


# After the marker, a trigger also accepts the start of the call as far as the grammar would: the trigger fires
# only at the end of a token, and llama.cpp feeds the grammar that token's text after the match. A token that
# runs past a marker into anything the grammar refuses would abort the engine, so the pattern must end there
# ("$"); such a token then triggers nothing and the text stays free (the parser still reads a valid call).
_CALL_START = [_WS_REGEX, r"\{", " ?", '"', "n", "a", "m", "e", '"']
_TRIGGERS: dict[FormatName, str] = {
    "hermes": "(<tool_call>" + _optional_chain(_CALL_START) + ")$",
    "mistral": r"(\[TOOL_CALLS\]" + _optional_chain([_WS_REGEX, r"\[", *_CALL_START]) + ")$",
    # The call is the whole reply: it must start the output (anchored at both ends: a full match). A reply may
    # also be JSON that is no call, so the trigger waits for the "name" key, as llama.cpp's does.
    "llama3": r'^[ \t\n]*(\{ ?"name"' + _optional_chain([" ?", ":", " ?", '"']) + ")$",
    "generic": "",
}


def _call_schema(fmt: FormatName, name: str, parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    key = _ARGUMENTS_KEY[fmt]
    properties: dict[str, Any] = {
        "name": {"const": name},
        key: copy.deepcopy(dict(parameters)) if parameters else {"type": "object", "properties": {}},
    }
    if fmt == "mistral":  # Mistral's template insists on ids of nine letters and digits
        properties["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
    return {"type": "object", "properties": properties, "required": list(properties)}


def build_grammar(
    fmt: FormatName, tools: Sequence[tuple[str, Mapping[str, Any] | None]], *, parallel: bool, required: bool
) -> str:
    """GBNF for calls of ``tools`` (name, parameter schema) in ``fmt``; "required" excludes a plain reply (the
    other formats' lazy grammar only starts at a call). A schema the converter cannot take is a 400."""
    from llama_cpp.llama_grammar import SchemaConverter

    key = _ARGUMENTS_KEY[fmt]
    converter = SchemaConverter(
        prop_order={"name": 0, key: 1, "id": 2}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    calls = []
    for i, (name, parameters) in enumerate(tools):
        schema = _call_schema(fmt, name, parameters)
        try:
            calls.append(converter.resolve_refs(schema, f"tools-{i}"))
        except Exception as exc:  # the converter asserts and raises bare errors on schemas it cannot take
            raise InvalidRequestError(
                f"tools[{i}].function.parameters cannot be turned into a grammar: {exc}",
                param=f"tools[{i}].function.parameters",
            ) from exc
    call = {"anyOf": calls} if len(calls) > 1 else calls[0]
    if fmt == "generic":
        many = {"type": "array", "items": call, "minItems": 1}
        wrapped = (
            {"type": "object", "properties": {"tool_calls": many}, "required": ["tool_calls"]}
            if parallel
            else {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"]}
        )
        reply = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
        root_schema = wrapped if required else {"anyOf": [wrapped, reply]}
        _convert(converter, root_schema, "")  # the rule "root"
        return str(converter.format_grammar())
    call_rule = _convert(converter, call, "tool-call")
    if fmt == "hermes":
        more = " (ws block)*" if parallel else ""
        root = f'block{more}\nblock ::= "<tool_call>" ws {call_rule} ws "</tool_call>"'
    elif fmt == "mistral":
        more = f' (ws "," ws {call_rule})*' if parallel else ""
        root = f'"[TOOL_CALLS]" ws "[" ws {call_rule}{more} ws "]"'
    else:  # llama3: one call, the whole reply
        root = call_rule
    return f"root ::= {root}\n{_WS_RULE}\n{converter.format_grammar()}"


def _convert(converter: Any, schema: dict[str, Any], name: str) -> str:
    """Visit ``schema`` as rule ``name``; the grammar is then in ``converter.format_grammar()``."""
    try:
        rule: str = converter.visit(schema, name)
    except Exception as exc:  # as above; a $ref cycle is a RecursionError
        raise InvalidRequestError(
            f"the tools' parameter schemas cannot be turned into a grammar: {type(exc).__name__}: {exc}",
            param="tools",
        ) from exc
    return rule


# --- parsing -----------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(
    r'\{\s*(?:"type"\s*:\s*"function"\s*,\s*)?"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)
_DECODER = json.JSONDecoder()
_OPEN_ESCAPE = re.compile(r"(\\+)(u[dD][89abAB][0-9a-fA-F]{2}(?:\\(?:u[0-9a-fA-F]{0,3})?)?|u[0-9a-fA-F]{0,3})?$")


@dataclass
class ParsedCall:
    name: str
    arguments: str  # the JSON text of the arguments as the model wrote it (a prefix while incomplete)
    complete: bool


@dataclass
class Parsed:
    content: str  # text for the client so far (a tail that may still turn into a call is held back)
    calls: list[ParsedCall] = field(default_factory=list)


def parse(fmt: FormatName, text: str, *, final: bool) -> Parsed:
    """The content and calls in the generated ``text``; ``final`` releases whatever was held back.

    Successive calls on a growing text give growing results (content and arguments only extend), so that
    stream deltas are the differences. Text that is not a valid call stays content.
    """
    if fmt == "generic":
        return _parse_generic(text, final)
    if fmt == "llama3":
        return _parse_llama3(text, final)
    marker = "<tool_call>" if fmt == "hermes" else "[TOOL_CALLS]"
    start = text.find(marker)
    if start < 0:
        return Parsed(_free_text(text, marker, final))
    calls: list[ParsedCall] = []
    if fmt == "hermes":
        _parse_calls(text, start, calls, opener="<tool_call>", closer="</tool_call>")
    else:
        _parse_calls(text, _expect(text, start + len(marker), "["), calls, separator=",")
    content = text[:start]
    if not calls and final:  # a marker but no call after it: it was text after all
        return Parsed(text)
    return Parsed(content.rstrip(), calls)  # the whitespace before a call is not part of the answer


def _parse_llama3(text: str, final: bool) -> Parsed:
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return Parsed(text if final or stripped else "")
    calls: list[ParsedCall] = []
    _parse_call(text, len(text) - len(stripped), calls)
    if calls:
        return Parsed("", calls)
    if final or not _could_start_call(stripped):
        return Parsed(text)
    return Parsed("")


def _could_start_call(text: str) -> bool:
    """Whether ``text`` may still grow into a call object: its start, compared without whitespace (a name
    being written counts; the arguments' key decides)."""
    squeezed = re.sub(r"\s+", "", text)
    starts = ('{"name":"', '{"type":"function","name":"')
    return any(p.startswith(squeezed) or squeezed.startswith(p) for p in starts)


def _parse_generic(text: str, final: bool) -> Parsed:
    head = re.compile(r'\s*\{\s*"(tool_calls|tool_call|response)"\s*:\s*').match(text)
    if head is None:
        return Parsed(text if final else "")
    kind, i = head.group(1), head.end()
    calls: list[ParsedCall] = []
    if kind == "response":
        return Parsed(_json_string_prefix(text, i))
    if kind == "tool_call":
        _parse_call(text, i, calls)
    else:
        _parse_calls(text, _expect(text, i, "["), calls, separator=",")
    return Parsed("", calls)


def _parse_calls(
    text: str, i: int | None, calls: list[ParsedCall], *, opener: str = "", closer: str = "", separator: str = ""
) -> None:
    """Calls from ``i`` on, each between ``opener`` and ``closer``, separated by ``separator``, into ``calls``."""
    first = True
    while i is not None:
        if not first:
            i = _expect(text, i, separator)
        i = _expect(text, _parse_call(text, _expect(text, i, opener), calls), closer)
        first = False


def _parse_call(text: str, i: int | None, calls: list[ParsedCall]) -> int | None:
    """Read one call object at ``i`` into ``calls`` (partial arguments included); the index after it, or None
    when it is incomplete or not a call."""
    if i is None:
        return None
    head = _NAME_RE.match(text, _skip_ws(text, i))
    if head is None:
        return None
    name = json.loads(f'"{head.group(1)}"')
    start = head.end()
    try:
        _, end = _DECODER.raw_decode(text, start)
    except ValueError:  # not complete yet
        calls.append(ParsedCall(name, text[start:], complete=False))
        return None
    calls.append(ParsedCall(name, text[start:end], complete=True))
    return _skip_to_object_end(text, end)


def _skip_to_object_end(text: str, i: int) -> int | None:
    """Past the remaining members of an object (Mistral's "id") and its closing brace."""
    while True:
        i = _skip_ws(text, i)
        if text.startswith("}", i):
            return i + 1
        if not text.startswith(",", i):
            return None
        try:
            i = _skip_ws(text, i + 1)
            _, i = _DECODER.raw_decode(text, i)  # the key
            i = _skip_ws(text, i)
            if not text.startswith(":", i):
                return None
            _, i = _DECODER.raw_decode(text, _skip_ws(text, i + 1))
        except ValueError:
            return None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def _expect(text: str, i: int | None, literal: str) -> int | None:
    if i is None:
        return None
    i = _skip_ws(text, i)
    return i + len(literal) if text.startswith(literal, i) else None


def _free_text(text: str, marker: str, final: bool) -> str:
    """Text before any call: all of it at the end, else without a tail that may begin the marker or that is
    whitespace (which a following call would drop)."""
    if final:
        return text
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return text[:-n].rstrip()
    return text.rstrip()


def _json_string_prefix(text: str, i: int) -> str:
    """The decoded prefix of the JSON string that starts at ``i`` (complete or not)."""
    if not text.startswith('"', i):
        return ""
    try:
        value, _ = _DECODER.raw_decode(text, i)
        return str(value)
    except ValueError:
        pass
    body = text[i + 1 :]
    # Cut an escape that is not complete yet: a lone backslash, a \u with fewer than four hex digits, or the
    # first half of a surrogate pair (decoded alone it would differ from the pair once the second half comes).
    tail = _OPEN_ESCAPE.search(body)
    if tail is not None and len(tail.group(1)) % 2 == 1:  # an odd run of backslashes: the last one escapes
        body = body[: tail.end(1) - 1]
    try:
        return str(json.loads(f'"{body}"'))
    except ValueError:
        return ""


# --- the stream of one choice -------------------------------------------------------------------------------------


class ToolCallStream:
    """Feeds one choice's text through ``parse`` and hands out what is new: content and tool-call deltas."""

    def __init__(self, fmt: FormatName, calls_expected: bool) -> None:
        self.format = fmt
        self.calls_expected = calls_expected
        self.text = ""
        self._sent_content = 0
        self._sent: list[tuple[str, int]] = []  # per call: its id and how much of its arguments went out
        self._parsed = Parsed("")

    def feed(self, text: str, *, final: bool = False) -> tuple[str, list[ToolCallDelta]]:
        """Add generated text; the new content and the new tool-call deltas."""
        self.text += text
        if not self.calls_expected:
            return text, []
        parsed = parse(self.format, self.text, final=final)
        self._parsed = parsed
        content = parsed.content[self._sent_content :] if len(parsed.content) > self._sent_content else ""
        self._sent_content = max(self._sent_content, len(parsed.content))
        deltas = []
        for index, call in enumerate(parsed.calls):
            if index == len(self._sent):
                self._sent.append((self._new_id(), 0))
                call_id, _ = self._sent[index]
                deltas.append(
                    ToolCallDelta(
                        index=index,
                        id=call_id,
                        type="function",
                        function=FunctionCallDelta(name=call.name, arguments=call.arguments),
                    )
                )
                self._sent[index] = (call_id, len(call.arguments))
                continue
            call_id, sent = self._sent[index]
            if len(call.arguments) > sent:
                deltas.append(ToolCallDelta(index=index, function=FunctionCallDelta(arguments=call.arguments[sent:])))
                self._sent[index] = (call_id, len(call.arguments))
        return content, deltas

    def finish(self, text: str = "") -> tuple[str, list[ToolCallDelta]]:
        return self.feed(text, final=True)

    def message(self) -> tuple[str | None, list[ToolCall] | None]:
        """The whole reply after ``finish``: content (None when there are only calls) and the calls."""
        if not self.calls_expected:
            return self.text, None
        calls = [
            ToolCall(id=self._sent[i][0], type="function", function=FunctionCall(name=c.name, arguments=c.arguments))
            for i, c in enumerate(self._parsed.calls)
        ]
        content = self._parsed.content
        if calls:
            return (content or None), calls
        return content, None

    @property
    def has_complete_calls(self) -> bool:
        return bool(self._parsed.calls) and all(call.complete for call in self._parsed.calls)

    def _new_id(self) -> str:
        if self.format == "mistral":  # its template refuses other ids when the call comes back in the history
            return "".join(secrets.choice(_MISTRAL_ID_ALPHABET) for _ in range(9))
        return f"call_{secrets.token_hex(12)}"


def finish_reason(reason: EngineFinishReason, stream: ToolCallStream) -> FinishReason:
    """OpenAI's "tool_calls" when the reply ended by itself in whole calls; one cut by max_tokens stays
    "length", one cut by a stop string "stop" (its last call's arguments are not whole JSON)."""
    return "tool_calls" if stream.has_complete_calls and reason == "stop" else reason


def reply(plan: ToolPlan | None, text: str, reason: EngineFinishReason) -> dict[str, Any]:
    """The ``message`` and ``finish_reason`` of a whole (not streamed) choice."""
    if plan is None:
        return {"message": AssistantReply(content=text), "finish_reason": reason}
    stream = plan.stream()
    stream.finish(text)
    content, calls = stream.message()
    return {
        "message": AssistantReply(content=content, tool_calls=calls),
        "finish_reason": finish_reason(reason, stream),
    }
