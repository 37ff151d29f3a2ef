"""Tool calls in chat completions: the official openai SDK against a real server and a real GGUF whose template
carries tools, the parsers of every call syntax on model outputs, and the refusals.

The real model is a copy of SmolLM2-135M-Instruct (the only real chat model here; its own template ignores
tools) whose GGUF metadata gets Qwen 2.5's chat template, written with the gguf package into a temporary
directory: Hermes / Qwen syntax (``<tool_call>{...}</tool_call>``), read from the GGUF as any model's template.
A 135M model does not choose tools well; what the tests pin down is the protocol: a forced call always has
arguments that satisfy the schema (the grammar), the SDK reassembles streamed calls into the same call, and a
tool result is rendered back for the next turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from server.engine.chat_template import ChatTemplate
from server.tools import ToolCallStream, build_grammar, detect_format, parse
from tests.server.support import ALIAS, LiveServer, make_settings, served

pytestmark = pytest.mark.llama

TEMPLATES = Path(__file__).resolve().parents[1] / "data" / "chat_templates"
TOOLS_ALIAS = "smol-tools"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER_SCHEMA},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a time zone.",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
        },
    },
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- model outputs, parsed -------------------------------------------------------------------------------------

# Replies in each family's syntax as those models write them (the shapes llama.cpp's tests/test-chat.cpp feeds
# its parsers): (format, generated text, expected content, expected calls as (name, arguments JSON)).
RECORDED = [
    pytest.param(
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
        None,
        [("get_weather", '{"city": "Paris", "unit": "celsius"}')],
        id="hermes-one-call",
    ),
    pytest.param(
        "hermes",
        "Let me check both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>',
        "Let me check both.",
        [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_time", '{"zone": "Europe/Paris"}')],
        id="hermes-content-then-two-calls",
    ),
    pytest.param("hermes", "Use <b>bold</b> text, a < b.", "Use <b>bold</b> text, a < b.", [], id="hermes-plain-text"),
    pytest.param(
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        None,
        [("get_weather", '{"city": "Paris", "unit": "celsius"}')],
        id="llama3-call",
    ),
    pytest.param(
        "llama3",
        '{"type": "function", "name": "get_time", "parameters": {"zone": "UTC"}}',
        None,
        [("get_time", '{"zone": "UTC"}')],
        id="llama3-call-with-type",
    ),
    pytest.param("llama3", '{"a": 1} is JSON.', '{"a": 1} is JSON.', [], id="llama3-json-text"),
    pytest.param(
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, "id": "a1B2c3D4e"},'
        ' {"name": "get_time", "arguments": {"zone": "UTC"}, "id": "Z9y8X7w6v"}]',
        None,
        [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_time", '{"zone": "UTC"}')],
        id="mistral-two-calls",
    ),
    pytest.param(
        "generic",
        '{"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}',
        None,
        [("get_time", '{"zone": "UTC"}')],
        id="generic-tool-calls",
    ),
    pytest.param(
        "generic",
        '{"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}',
        None,
        [("get_weather", '{"city": "Oslo", "unit": "celsius"}')],
        id="generic-tool-call",
    ),
    pytest.param(
        "generic",
        '{"response": "It is \\"sunny\\" \\u2600 in Paris.\\nEnjoy \\ud83d\\ude00"}',
        'It is "sunny" \u2600 in Paris.\nEnjoy \U0001f600',
        [],
        id="generic-response",
    ),
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), RECORDED)
def test_parser_reads_each_family_whole(fmt: Any, text: str, content: str | None, calls: list[Any]) -> None:
    stream = ToolCallStream(fmt, calls_expected=True)
    stream.finish(text)
    got_content, got_calls = stream.message()
    assert got_content == content
    assert [(c.function.name, c.function.arguments) for c in got_calls or []] == calls
    assert all(c.id.startswith("call_") or fmt == "mistral" for c in got_calls or [])


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), RECORDED)
@pytest.mark.parametrize("piece", [1, 3], ids=["by-char", "by-3-chars"])
def test_streamed_deltas_add_up_to_the_whole_parse(
    fmt: Any, text: str, content: str | None, calls: list[Any], piece: int
) -> None:
    """Content and arguments only ever grow, the first delta of a call carries id and name, later ones none."""
    stream = ToolCallStream(fmt, calls_expected=True)
    streamed_content = ""
    streamed: dict[int, dict[str, Any]] = {}
    pieces = [text[i : i + piece] for i in range(0, len(text), piece)]
    for i, part in enumerate(pieces):
        new_content, deltas = stream.finish(part) if i == len(pieces) - 1 else stream.feed(part)
        streamed_content += new_content
        for delta in deltas:
            if delta.index not in streamed:
                assert delta.id and delta.type == "function" and delta.function.name
                streamed[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and delta.function.name is None
            streamed[delta.index]["arguments"] += delta.function.arguments or ""
    whole_content, whole_calls = stream.message()
    assert streamed_content == (whole_content or "")
    assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == calls
    assert [c["id"] for _, c in sorted(streamed.items())] == [c.id for c in whole_calls or []]


def test_a_call_cut_short_keeps_its_partial_arguments() -> None:
    parsed = parse("hermes", 'Sure <tool_call>\n{"name": "get_time", "arguments": {"zone": "Eu', final=True)
    assert parsed.content == "Sure"
    assert [(c.name, c.arguments, c.complete) for c in parsed.calls] == [("get_time", '{"zone": "Eu', False)]


def test_finish_reason_says_tool_calls_only_for_whole_calls() -> None:
    from server.tools import finish_reason

    whole, cut = ToolCallStream("hermes", calls_expected=True), ToolCallStream("hermes", calls_expected=True)
    whole.finish('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>')
    cut.finish('<tool_call>{"name": "get_time", "arguments": {"zone": "U')  # a stop string cut it
    assert finish_reason("stop", whole) == "tool_calls" and finish_reason("length", whole) == "length"
    assert finish_reason("stop", cut) == "stop" and finish_reason("length", cut) == "length"


def test_held_back_text_that_never_becomes_a_marker_is_released() -> None:
    stream = ToolCallStream("hermes", calls_expected=True)
    assert stream.feed("a <tool_") == ("a", [])  # may still become <tool_call>
    assert stream.feed("box> done") == (" <tool_box> done", [])


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ("qwen2.5-instruct.jinja", "hermes"),
        ("llama-3.1-instruct.jinja", "llama3"),
        ("mistral-nemo-instruct.jinja", "mistral"),
    ],
)
def test_call_syntax_is_read_from_the_template_and_tools_reach_the_prompt(template: str, fmt: str) -> None:
    text = (TEMPLATES / template).read_text()
    chat = ChatTemplate(text, "config", bos_token="<s>", eos_token="</s>")
    assert detect_format(text) == fmt
    assert chat.facts.renders_tools and chat.facts.renders_tool_calls
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "a1B2c3D4e",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "18 degrees"},
    ]
    prompt = chat.render(history, tools=TOOLS)
    assert "The local time in a time zone." in prompt  # the tools' descriptions
    assert '"city": "Paris"' in prompt and "18 degrees" in prompt  # the call and its result, arguments as JSON


# A template that writes tools but knows no call syntax (and drops assistant tool_calls): the generic format.
PLAIN_TOOLS_TEMPLATE = (
    "{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "
)


def plan_for(template_text: str, **body: Any) -> Any:
    from server.protocol import ChatCompletionRequest
    from server.tools import plan_tools

    facts = ChatTemplate(template_text, "config", bos_token="", eos_token="").facts
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, "tools": TOOLS, **body})
    return plan_tools(request, facts, "m")


@pytest.mark.parametrize(
    ("template", "fmt", "lazy"),
    [
        ("qwen2.5-instruct.jinja", "hermes", True),
        ("llama-3.1-instruct.jinja", "llama3", True),
        ("mistral-nemo-instruct.jinja", "mistral", True),
        (None, "generic", False),  # its reply is JSON from the first token
    ],
)
def test_auto_waits_for_a_call_and_required_holds_from_the_first_token(
    template: str | None, fmt: str, lazy: bool
) -> None:
    text = (TEMPLATES / template).read_text() if template else PLAIN_TOOLS_TEMPLATE
    auto, required = plan_for(text), plan_for(text, tool_choice="required")
    assert auto.format == required.format == fmt
    assert bool(auto.constraint.triggers) == lazy and required.constraint.triggers == ()
    # The lazy formats share one grammar (the trigger makes "auto"); generic "auto" also allows a plain answer.
    assert (auto.constraint.gbnf != required.constraint.gbnf) == (fmt == "generic")
    assert plan_for(text, tool_choice="none").constraint is None


def test_generic_format_instructs_the_model_and_spells_out_calls_the_template_drops() -> None:
    plan = plan_for(PLAIN_TOOLS_TEMPLATE)
    assert plan.template_drops_calls
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "UTC"}}}
    messages = plan.messages([*ASK, {"role": "assistant", "content": "", "tool_calls": [call]}])
    assert messages[0]["role"] == "system" and "Respond in JSON format" in messages[0]["content"]
    assert json.loads(messages[-1]["content"]) == {"tool_calls": [{"name": "get_time", "arguments": {"zone": "UTC"}}]}
    chat = ChatTemplate(PLAIN_TOOLS_TEMPLATE, "config", bos_token="", eos_token="")
    assert '"zone": "UTC"' in chat.render(messages, tools=plan.tools)


def test_tools_with_another_output_constraint_are_a_400() -> None:
    from server.errors import InvalidRequestError

    qwen = (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
    with pytest.raises(InvalidRequestError) as info:
        plan_for(qwen, response_format={"type": "json_object"})
    assert info.value.param == "response_format"
    assert plan_for(qwen, tool_choice="none", response_format={"type": "json_object"}).constraint is None


@pytest.mark.parametrize(
    ("parameters", "param"),
    [({"type": "frobnicate"}, "tools"), ({"$ref": "#/$defs/missing"}, "tools[0].function.parameters")],
    ids=["unknown-type", "dangling-ref"],
)
def test_a_schema_the_grammar_cannot_express_is_a_400(parameters: dict[str, Any], param: str) -> None:
    from server.errors import InvalidRequestError

    tool = {"type": "function", "function": {"name": "odd", "parameters": parameters}}
    with pytest.raises(InvalidRequestError, match="cannot be turned into a grammar") as info:
        plan_for((TEMPLATES / "qwen2.5-instruct.jinja").read_text(), tools=[tool])
    assert info.value.param == param


def test_a_template_that_ignores_tools_is_detected(smollm2: Path) -> None:
    from server.engine.vocab import Tokenizer

    tokenizer = Tokenizer(smollm2)
    try:
        facts = tokenizer.template.facts
        assert facts.source == "gguf" and not facts.renders_tools and not facts.renders_tool_calls
    finally:
        tokenizer.close()


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral", "generic"])
def test_every_format_gets_a_grammar_llama_cpp_accepts(smollm2: Path, fmt: Any) -> None:
    from server.engine.vocab import Tokenizer

    tokenizer = Tokenizer(smollm2)
    try:
        tools = [(t["function"]["name"], t["function"]["parameters"]) for t in TOOLS]
        for parallel, required in ((True, False), (False, True)):
            tokenizer._grammars.check(build_grammar(fmt, tools, parallel=parallel, required=required), param="tools")
    finally:
        tokenizer.close()


LAZY_CHILD = """
import ctypes, sys
from server.engine.vocab import Tokenizer, llama_cpp
from server.tools import build_grammar
lc = llama_cpp()
tokenizer = Tokenizer(sys.argv[1])
grammar = build_grammar(sys.argv[4], [("get_time", None)], parallel=False, required=False)
patterns = (ctypes.c_char_p * 1)(sys.argv[2].encode())
sampler = lc.llama_sampler_init_grammar_lazy_patterns(tokenizer._vocab, grammar.encode(), b"root", patterns, 1, None, 0)
for token in tokenizer._tokenize(sys.argv[3], add_bos=False):
    lc.llama_sampler_accept(sampler, token)
print("accepted")
"""


@pytest.mark.parametrize(
    ("fmt", "text", "pattern", "survives"),
    [
        ("hermes", 'x <tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', None, True),
        ("hermes", "x <tool_call>. hello", None, True),  # SmolLM2 writes ">." as one token: no trigger, free text
        ("hermes", "x <tool_call>. hello", "(<tool_call>)", False),  # naive: llama.cpp throws, the process aborts
        ("llama3", '{"name": "get_time", "parameters": {}}', None, True),
        ("llama3", '{"answer": 42} is the JSON.', None, True),
    ],
    ids=["hermes-call", "token-past-the-marker", "naive-pattern-aborts", "llama3-call", "llama3-other-json"],
)
def test_the_lazy_trigger_fires_only_where_the_grammar_can_go_on(
    smollm2: Path, fmt: str, text: str, pattern: str | None, survives: bool
) -> None:
    """The tokens of ``text`` fed to llama.cpp's lazy grammar with the format's trigger, in a child process
    (an abort inside the sampler would take the test process with it)."""
    import os
    import subprocess
    import sys

    from server.tools import _TRIGGERS

    env = {**os.environ, "GGML_NO_BACKTRACE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    child = subprocess.run(
        [sys.executable, "-c", LAZY_CHILD, str(smollm2), pattern or _TRIGGERS[fmt], text, fmt],  # type: ignore[index]
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert (child.returncode == 0 and "accepted" in child.stdout) == survives, child.stderr[-2000:]
    if not survives:
        assert "empty grammar stack" in child.stderr


@pytest.mark.parametrize(
    ("generated", "triggers"),
    [
        ('{"name"', True),
        ('\n{"name": "', True),
        ('{"', False),  # JSON that may be no call: the name key decides
        ('{"answer": 42}', False),
        ('{"name": "get_time", "par', False),  # a token ran past the call's start: free text, no abort
        ('Sure: {"name": "', False),  # a Llama 3.x call is the whole reply
    ],
)
def test_llama3_trigger_waits_for_the_name_key(generated: str, triggers: bool) -> None:
    import re

    from server.tools import _TRIGGERS

    pattern = _TRIGGERS["llama3"]
    assert pattern.startswith("^") and pattern.endswith("$")  # llama.cpp then matches the whole text
    assert (re.fullmatch(pattern, generated) is not None) == triggers


# --- a real server ----------------------------------------------------------------------------------------------


def with_template(source: Path, target: Path, template: str) -> Path:
    """A copy of the GGUF ``source`` whose tokenizer.chat_template is ``template`` (gguf's own copier)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(source))
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None
    writer = gguf.GGUFWriter(str(target), arch=arch.contents(), endianess=reader.endianess)
    new = {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template)}
    copy_with_new_metadata(reader, writer, new, [])
    return target


@pytest.fixture(scope="module")
def tools_server(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    qwen_template = (TEMPLATES / "qwen2.5-instruct.jinja").read_text()
    model = with_template(smollm2, tmp_path_factory.mktemp("tools") / "smollm2-qwen-template.gguf", qwen_template)
    settings = make_settings(models=[{"path": str(model), "alias": TOOLS_ALIAS}], ctx=2048, parallel=2)
    with served(settings) as server:
        yield server


@pytest.fixture
def tools_client(tools_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{tools_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def valid_call(call: Any, name: str | None = None) -> None:
    """An OpenAI tool call of one of TOOLS (of ``name`` if given) whose arguments satisfy the tool's schema."""
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == name if name else call.function.name in {t["function"]["name"] for t in TOOLS}
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)


def create(client: openai.OpenAI, **body: Any) -> Any:
    """chat.completions.create on the tools model with ASK and TOOLS unless ``body`` says otherwise."""
    return client.chat.completions.create(**{"model": TOOLS_ALIAS, "messages": ASK, "tools": TOOLS, **body})


def test_round_trip_call_result_answer(tools_client: openai.OpenAI) -> None:
    """The SDK's round trip: a call (required), the tool's result sent back, then the model's answer."""
    first = create(tools_client, tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) == 1
    valid_call(calls[0])
    messages: list[Any] = [*ASK, choice.message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": "18 degrees, sunny"} for c in calls]
    final = create(tools_client, messages=messages, tool_choice="none", temperature=0, max_tokens=24)
    answer = final.choices[0]
    assert answer.message.tool_calls is None
    assert answer.finish_reason in ("stop", "length") and answer.message.content
    # The call and its result reached the prompt: the second prompt is longer by at least their tokens.
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + 15


def test_streamed_call_matches_the_whole_one(tools_client: openai.OpenAI) -> None:
    """Streaming: the first delta of a call carries index, id, type and name; the arguments follow in pieces;
    the last chunk says "tool_calls"; put together it is the call a non-streamed request gets (temperature 0)."""
    body: dict[str, Any] = {
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_tokens": 80,
    }
    whole = create(tools_client, **body)
    chunks = list(create(tools_client, **body, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].index == 0 and deltas[0].id and deltas[0].type == "function"
    assert deltas[0].function.name == "get_weather"
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    assert len(deltas) > 2  # the arguments came in pieces, as they were generated
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    expected = whole.choices[0].message.tool_calls[0]
    assert arguments == expected.function.arguments
    valid_call(expected, "get_weather")


def test_named_tool_choice_gives_arguments_valid_against_the_schema(tools_client: openai.OpenAI) -> None:
    for seed in (1, 2):  # sampled, not greedy: the grammar, not luck, keeps them valid
        reply = create(
            tools_client,
            messages=[{"role": "user", "content": "Weather for Tokyo and Lima, please."}],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
            temperature=1.0,
            seed=seed,
            max_tokens=120,
        )
        calls = reply.choices[0].message.tool_calls or []
        assert reply.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        valid_call(calls[0], "get_weather")


def test_tool_choice_none_answers_in_text(tools_client: openai.OpenAI) -> None:
    reply = create(tools_client, tool_choice="none", temperature=0, max_tokens=24)
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")


def test_auto_tool_choice_gives_text_or_valid_calls(tools_client: openai.OpenAI) -> None:
    """ "auto": the grammar waits for <tool_call>; whatever the model chooses comes back as text or valid calls."""
    choice = create(tools_client, temperature=0, max_tokens=60).choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            valid_call(call)
    else:
        assert choice.message.content and "<tool_call>" not in choice.message.content


def test_auto_call_starts_when_the_model_writes_the_marker(tools_client: openai.OpenAI, smollm2: Path) -> None:
    """ "auto" end to end: free text until the model writes <tool_call>, then the lazy grammar holds the call.
    A 135M model never chooses a tool by itself, so logit_bias pushes it onto the marker's tokens; the one tool
    takes only an enum, so that the pushed tokens cannot run on inside the call, where the grammar rules."""
    from server.engine.vocab import Tokenizer

    tokenizer = Tokenizer(smollm2)
    try:
        marker_tokens = tokenizer._tokenize("<tool_call>", add_bos=False)
    finally:
        tokenizer.close()
    unit_schema = {"type": "object", "properties": {"unit": {"enum": ["celsius", "kelvin"]}}, "required": ["unit"]}
    tool = {"type": "function", "function": {"name": "set_unit", "parameters": unit_schema}}
    body: dict[str, Any] = {
        "tools": [tool],
        "parallel_tool_calls": False,
        "logit_bias": {str(t): 100 for t in marker_tokens},
        "temperature": 0,
        "max_tokens": 60,
    }
    reply = create(tools_client, **body).choices[0]
    assert reply.finish_reason == "tool_calls" and reply.message.content is None
    (call,) = reply.message.tool_calls
    assert call.function.name == "set_unit"
    jsonschema.validate(json.loads(call.function.arguments), unit_schema)
    chunks = [c for c in create(tools_client, **body, stream=True) if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "set_unit"
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_each_of_n_choices_is_parsed_on_its_own(tools_client: openai.OpenAI) -> None:
    """n=2 streamed: the choices' chunks interleave, each index gets its own call and its own finish."""
    chunks = create(
        tools_client,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        n=2,
        temperature=1.0,
        seed=7,
        max_tokens=80,
        stream=True,
    )
    arguments: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0  # one call per choice: the call index counts within its choice
                arguments[choice.index] += delta.function.arguments or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "tool_calls", 1: "tool_calls"}
    for text in arguments.values():
        jsonschema.validate(json.loads(text), WEATHER_SCHEMA)


# --- refusals (the session server: SmolLM2 with its own template, which ignores tools) --------------------------


def test_a_template_without_tools_is_a_400_naming_the_reason(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=ALIAS, messages=ASK, tools=TOOLS, max_tokens=8)  # type: ignore[arg-type]
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "tools"
    assert "never writes the tools it is given into the prompt" in error["message"]
    # tool_choice "none" needs nothing of the template: the request is answered.
    reply = client.chat.completions.create(
        model=ALIAS,
        messages=ASK,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.tool_calls is None


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"tool_choice": "auto"}, "tool_choice", "only allowed when tools are specified"),
        ({"parallel_tool_calls": True}, "parallel_tool_calls", "only allowed when tools are specified"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "not among the tools",
        ),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "twice"),
        ({"functions": [TOOLS[0]["function"]]}, "functions", "send tools and tool_choice instead"),
    ],
    ids=["choice-without-tools", "parallel-without-tools", "unknown-named-function", "duplicate-names", "legacy"],
)
def test_malformed_tool_requests_are_400s(http: httpx.Client, body: dict[str, Any], param: str, words: str) -> None:
    response = http.post("/v1/chat/completions", json={"model": ALIAS, "messages": ASK, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]
