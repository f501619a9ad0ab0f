#!/usr/bin/env python3
"""Builds tests/fixtures/chat/tool-goldens.json: conversations with OpenAI
`tools`, assistant `tool_calls` and `tool` messages rendered by the real chat
templates of the families that have a tool format (qwen2.5, qwen3, llama3.1,
mistral-v0.3), with transformers' own renderer (render_jinja_template, as
apply_chat_template(messages, tools=tools, add_generation_prompt=...) calls
it: its `tojson` is json.dumps(ensure_ascii=False), key order kept).

The templates are the ones hack/make-tokenizer-fixtures.py writes into
tests/fixtures/chat/goldens.json (run its `chat` step first).

Messages are stored as an OpenAI client sends them: a tool call's
`arguments` is a JSON string. The agent hands the templates what they were
written for, and so does this script when it renders:
  - qwen3 writes `arguments` as given when it is a string: kept a string;
  - qwen2.5, llama3.1 and mistral-v0.3 pipe `arguments` through tojson,
    which would quote a string: parsed into an object first (as vLLM does).

usage: /opt/lpref/bin/python hack/make-tool-goldens.py
"""

import copy
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATDIR = os.path.join(ROOT, "tests", "fixtures", "chat")
FAMILIES = ["qwen2.5", "qwen3", "llama3.1", "mistral-v0.3"]
# families whose template sees `arguments` as the client's string
ARGUMENTS_AS_STRING = {"qwen3"}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"Paris\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"tz": {"type": "string"}},
            "required": ["tz"],
            "additionalProperties": False,
        },
    },
}
# unicode, escapes, floats, nesting, empty containers, null
UNICODE = {
    "type": "function",
    "function": {
        "name": "météo_locale",
        "description": "Météo « locale » — en °C 🌦\nTab\there, back\\slash, \u0001 control",
        "parameters": {
            "type": "object",
            "properties": {
                "ville": {"type": "string", "description": "Nom de la ville (Zürich, 東京)"},
                "précision": {"type": "number", "minimum": 1e-07, "default": 0.5, "maximum": 1e+22},
                "jours": {"type": "integer", "minimum": 0, "maximum": 16, "default": -3},
                "options": {"type": "object", "properties": {}, "required": []},
                "extra": {"anyOf": [{"type": "null"}, {"type": "array", "items": {"type": "boolean"}}],
                          "default": None, "examples": [True, False, 123456789012, 1.0, 100.25, 1e16, 0.0001]},
            },
            "required": ["ville"],
        },
    },
}


def call(cid, name, arguments):
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


S = lambda c: {"role": "system", "content": c}
U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
AC = lambda c, calls: {"role": "assistant", "content": c, "tool_calls": calls}
T = lambda cid, c: {"role": "tool", "tool_call_id": cid, "content": c}
TN = lambda cid, name, c: {"role": "tool", "tool_call_id": cid, "name": name, "content": c}

PARIS = call("Abc123xyz", "get_weather", '{"city": "Paris"}')
LYON = call("Def456uvw", "get_weather", '{"city":"Lyon","unit":"celsius"}')
TOKYO = call("Ghi789rst", "get_time", '{\n  "tz": "Asia/Tokyo"\n}')

CASES = [
    ("tools_user", [WEATHER, TIME], [U("What's the weather in Paris?")], True),
    ("tools_system_user", [WEATHER, TIME], [S("You are a weather bot."), U("Weather in Paris?")], True),
    ("tools_no_prompt", [WEATHER], [U("Weather in Paris?")], False),
    (
        "round_trip_one",
        [WEATHER],
        [U("Weather in Paris?"), AC(None, [PARIS]), T("Abc123xyz", '{"temp": 18, "sky": "clear"}'),
         A("It is 18 °C and clear."), U("Thanks!")],
        True,
    ),
    (
        "round_trip_one_system",
        [WEATHER],
        [S("Be brief."), U("Weather in Paris?"), AC(None, [PARIS]), T("Abc123xyz", "18 degrees")],
        True,
    ),
    (
        "round_trip_two",
        [WEATHER, TIME],
        [U("Weather in Lyon and time in Tokyo?"), AC(None, [LYON, TOKYO]),
         T("Def456uvw", '{"temp": 21}'), TN("Ghi789rst", "get_time", "09:30"), A("21 °C; 09:30.")],
        True,
    ),
    (
        "round_trip_two_pending",
        [WEATHER, TIME],
        [S("You answer in French."), U("Weather in Lyon and time in Tokyo?"), AC(None, [LYON, TOKYO]),
         T("Def456uvw", '{"temp": 21}'), T("Ghi789rst", "09:30")],
        True,
    ),
    (
        "call_with_content",
        [WEATHER],
        [U("Weather in Paris?"), AC("Let me check.", [PARIS]), T("Abc123xyz", "sunny"), U("And now?")],
        True,
    ),
    (
        "calls_without_tools",
        None,
        [U("Weather in Paris?"), AC(None, [PARIS]), T("Abc123xyz", "sunny"), A("Sunny."), U("Ok")],
        True,
    ),
    ("unicode_tools", [UNICODE], [S("Réponds en français."), U("Quel temps à Zürich ? 🌦")], True),
    ("tools_system_only", [WEATHER], [S("Only a system prompt.")], True),
    ("bad_call_id", [WEATHER], [U("Weather?"), AC(None, [call("call_1", "get_weather", '{"city": "Paris"}')]),
                                T("call_1", "sunny")], True),
    ("repeated_user_text", [WEATHER], [U("Again?"), A("Yes."), U("Again?")], True),
    (
        "think_and_call",
        [WEATHER],
        [U("Weather in Paris?"), AC("<think>\nI should call the tool.\n</think>\n\n", [PARIS]),
         T("Abc123xyz", "sunny")],
        True,
    ),
]


def for_template(family, messages):
    """The messages as the agent hands them to the family's template."""
    out = copy.deepcopy(messages)
    if family in ARGUMENTS_AS_STRING:
        return out
    for m in out:
        for c in m.get("tool_calls") or []:
            c["function"]["arguments"] = json.loads(c["function"]["arguments"])
    return out


def main():
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    goldens = json.load(open(os.path.join(CHATDIR, "goldens.json"), encoding="utf-8"))
    cases = []
    for family in FAMILIES:
        tpl = goldens["templates"][family]
        for name, tools, messages, gen in CASES:
            try:
                rendered, _ = render_jinja_template(
                    conversations=[for_template(family, messages)],
                    tools=copy.deepcopy(tools),
                    chat_template=tpl["template"],
                    add_generation_prompt=gen,
                    bos_token=tpl["bos"],
                    eos_token=tpl["eos"],
                )
                text, error = rendered[0], None
            except jinja2.exceptions.TemplateError as e:
                text, error = None, str(e)
            cases.append(
                {
                    "name": "%s/%s" % (family, name),
                    "family": family,
                    "add_generation_prompt": gen,
                    "tools": tools,
                    "messages": messages,
                    "rendered": text,
                    "error": error,
                }
            )
    os.makedirs(CHATDIR, exist_ok=True)
    with open(os.path.join(CHATDIR, "tool-goldens.json"), "w", encoding="utf-8") as f:
        json.dump({"cases": cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("tool goldens: %d cases, %d raise" % (len(cases), sum(1 for c in cases if c["error"])))


if __name__ == "__main__":
    main()
