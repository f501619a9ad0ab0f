#!/usr/bin/env python3
"""Tool calling (issue 14) against real agents: the default model (SmolLM2,
whose ChatML template has no tool format: "required" and named choices use
loraplane's generic format and a grammar, "auto" is refused), and the same
model under the Qwen3 template (Hermes tool format: "auto" is parsed).
Calls come back with ids and JSON arguments valid against the function's
parameters (checked with `jsonschema`), finish_reason "tool_calls",
streamed as OpenAI streams them; a round trip with the tool's result; the
official openai client; langchain-openai's bind_tools and
with_structured_output (every method). Prints one PASS/FAIL line per test."""

import json
import shutil
import sys
import tempfile

import harness as A

try:
    import jsonschema
except ImportError:
    print("FAIL test-tools: the jsonschema package is missing (make deps)")
    sys.exit(1)

TMP = tempfile.mkdtemp(prefix="lp-tools-")
_agents = {}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def agent(template=None):
    key = template or "default"
    if key not in _agents:
        extra = ["--chat-template", template] if template else []
        _agents[key] = A.Agent(*extra, *A.SMOL_ARGS, model=A.MODEL)
    return _agents[key]


def chat(body, template=None, status=200):
    a = agent(template)
    body = dict(body, model=a.base_name())
    got, obj = a.json("POST", "/v1/chat/completions", body)
    assert got == status, (body, got, obj)
    return obj


def ask(question="What is the weather in Paris?"):
    return [{"role": "user", "content": question}]


def check_calls(msg, names=None, count=None):
    calls = msg["tool_calls"]
    assert calls, msg
    if count is not None:
        assert len(calls) == count, calls
    ids = set()
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_"), c
        assert c["id"] not in ids
        ids.add(c["id"])
        name = c["function"]["name"]
        assert names is None or name in names, c
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[name])
    return calls


@A.test
def required_gives_valid_calls():
    obj = chat({"messages": ask(), "tools": [WEATHER, TIME], "tool_choice": "required",
                "temperature": 0.8, "seed": 1, "max_tokens": 200,
                "parallel_tool_calls": False})
    ch = obj["choices"][0]
    assert ch["finish_reason"] == "tool_calls", ch
    assert ch["message"]["content"] is None, ch
    check_calls(ch["message"], count=1)


@A.test
def named_function_is_the_one_called():
    for seed in range(3):
        obj = chat({"messages": ask("What time is it in Tokyo?"), "tools": [WEATHER, TIME],
                    "tool_choice": {"type": "function", "function": {"name": "get_time"}},
                    "temperature": 0.8, "seed": seed, "max_tokens": 120})
        ch = obj["choices"][0]
        assert ch["finish_reason"] == "tool_calls", ch
        check_calls(ch["message"], names={"get_time"}, count=1)


@A.test
def streamed_calls_join_to_the_whole_ones():
    body = {"messages": ask(), "tools": [WEATHER, TIME], "tool_choice": "required",
            "temperature": 0, "max_tokens": 200, "parallel_tool_calls": False}
    whole = chat(body)["choices"][0]["message"]["tool_calls"]
    a = agent()
    status, _, data = a.request("POST", "/v1/chat/completions",
                                dict(body, model=a.base_name(), stream=True))
    assert status == 200, data
    events, done = A.sse_events(data)
    assert done
    calls, finish = {}, None
    for ev in events:
        ch = ev["choices"][0]
        for tc in ch["delta"].get("tool_calls") or []:
            c = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in tc:
                assert c["id"] is None, tc
                c["id"], c["name"] = tc["id"], tc["function"]["name"]
                assert tc["type"] == "function" and tc["function"]["arguments"] == "", tc
            else:
                c["arguments"] += tc["function"]["arguments"]
        finish = ch["finish_reason"] or finish
    assert finish == "tool_calls", events[-1]
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(w["function"]["name"], w["function"]["arguments"]) for w in whole], (calls, whole)


@A.test
def auto_needs_a_template_with_a_tool_format():
    obj = chat({"messages": ask(), "tools": [WEATHER]}, status=400)
    assert obj["error"]["param"] == "tool_choice", obj
    assert "tool format" in obj["error"]["message"], obj
    # "none" with tools is fine: plain content
    obj = chat({"messages": ask(), "tools": [WEATHER], "tool_choice": "none", "max_tokens": 8})
    assert "tool_calls" not in obj["choices"][0]["message"], obj


@A.test
def bad_tool_fields_are_refused_by_name():
    for body, param in [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
         "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function",
                                              "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object",
                                        "properties": {"a": {"type": "string", "not": {}}}}}}],
          "tool_choice": "required"}, "tools[0].function.parameters"),
    ]:
        obj = chat(dict(body, messages=ask()), status=400)
        assert obj["error"]["param"] == param, (body, obj)


@A.test
def round_trip_with_the_tool_result():
    first = chat({"messages": ask(), "tools": [WEATHER], "tool_choice": "required",
                  "temperature": 0, "max_tokens": 120, "parallel_tool_calls": False})
    call = first["choices"][0]["message"]["tool_calls"][0]
    msgs = ask() + [{"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": call["id"],
                     "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    obj = chat({"messages": msgs, "tools": [WEATHER], "tool_choice": "none",
                "temperature": 0, "max_tokens": 40})
    ch = obj["choices"][0]
    assert ch["message"]["content"], ch
    assert "tool_calls" not in ch["message"], ch


@A.test
def hermes_template_auto():
    """Under the Qwen3 template (Hermes format) "auto" is accepted; the
    model may answer or call; whatever it does comes back well formed."""
    obj = chat({"messages": ask(), "tools": [WEATHER], "temperature": 0, "max_tokens": 60},
               template="qwen3")
    ch = obj["choices"][0]
    if ch["finish_reason"] == "tool_calls":
        check_calls(ch["message"])
    else:
        assert ch["message"]["content"], ch
    # "required" under Hermes: <tool_call> blocks, parsed into calls
    obj = chat({"messages": ask(), "tools": [WEATHER], "tool_choice": "required",
                "temperature": 0.7, "seed": 4, "max_tokens": 200, "parallel_tool_calls": False},
               template="qwen3")
    ch = obj["choices"][0]
    assert ch["finish_reason"] == "tool_calls", ch
    check_calls(ch["message"], count=1)


@A.test
def openai_client_tool_calls():
    client = agent().client()
    r = client.chat.completions.create(
        model=agent().base_name(), messages=ask(), tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=120)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1, r
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS["get_weather"])


@A.test
def langchain_bind_tools_and_structured_output():
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """The weather in a city."""
        city: str = Field(description="the city", max_length=30)
        unit: str = Field(description="celsius or fahrenheit")

    class Person(BaseModel):
        name: str = Field(max_length=20)
        age: int

    a = agent()
    llm = ChatOpenAI(base_url=a.url("/v1"), api_key="unused", model=a.base_name(),
                     temperature=0, max_tokens=150)
    msg = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Paris?")
    assert len(msg.tool_calls) >= 1 and msg.tool_calls[0]["name"] == "Weather", msg
    Weather(**msg.tool_calls[0]["args"])
    msg = llm.bind_tools([Weather], tool_choice="required").invoke("Weather in Rome?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "Weather", msg
    for method in ("json_schema", "function_calling", "json_mode"):
        out = llm.with_structured_output(Person, method=method).invoke(
            "Invent a person; answer in JSON with name and age.")
        assert isinstance(out, Person), (method, out)


def cleanup():
    failed = 0
    for k, a in _agents.items():
        failed += A.stop_agent(a, f"test-tools:shutdown-{k}")
    shutil.rmtree(TMP, ignore_errors=True)
    return failed


if __name__ == "__main__":
    A.main("test-tools", cleanup)
