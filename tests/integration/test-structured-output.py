#!/usr/bin/env python3
"""Structured output (issue 14) against a real agent on the default model
(SmolLM2) with two adapters: response_format json_object and json_schema
sampled at temperature 0.8 over the base model and the adapters, every
output validated with the `jsonschema` package; the official openai
client's parse(); a mixed batch of constrained and unconstrained requests
(the unconstrained ones give the tokens they give alone); streaming, n > 1
and logprobs under a constraint; refusals naming the unsupported keyword.
Prints one PASS/FAIL line per test."""

import concurrent.futures
import json
import os
import shutil
import sys
import tempfile

import harness as A

try:
    import jsonschema
except ImportError:  # make deps installs it
    print("FAIL test-structured-output: the jsonschema package is missing (make deps)")
    sys.exit(1)

TMP = tempfile.mkdtemp(prefix="lp-structured-")
ADAPTERS = {"r4-qv": os.path.join(A.SMOL_LORAS, "r4-qv"),
            "r8-od": os.path.join(A.SMOL_LORAS, "r8-od")}
_agent = None


def agent():
    global _agent
    if _agent is None:
        _agent = A.Agent("--lora-modules", *(f"{k}={v}" for k, v in ADAPTERS.items()),
                         "--max-num-seqs", "16", *A.SMOL_ARGS, model=A.MODEL)
    return _agent


def base():
    return agent().base_name()


def chat(body, status=200):
    # a long wait: 50 requests queue behind 16 slots (slow under make asan)
    got, obj = agent().json("POST", "/v1/chat/completions", body, timeout=900)
    assert got == status, (body, got, obj)
    return obj


# Schemas whose outputs are bounded (strings with maxLength or enums,
# arrays with maxItems), so that max_tokens never cuts one short.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
        "items": {"type": "array", "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "maxLength": 10},
                           "qty": {"type": "integer"},
                           "price": {"type": "number"}},
            "required": ["sku", "qty", "price"],
            "additionalProperties": False}},
        "paid": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 20},
    },
    "required": ["id", "items", "paid", "note"],
    "additionalProperties": False,
}
SHAPE = {
    "type": "object",
    "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"},
                                           "radius": {"type": "number"}},
         "required": ["kind", "radius"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "rect"},
                                           "w": {"type": "integer"}, "h": {"type": "integer"}},
         "required": ["kind", "w", "h"], "additionalProperties": False},
    ]}},
    "required": ["shape"],
    "additionalProperties": False,
}
TREE = {
    "$defs": {"node": {
        "type": "object",
        "properties": {"label": {"type": "string", "maxLength": 8},
                       "children": {"type": "array", "maxItems": 2,
                                    "items": {"$ref": "#/$defs/node"}}},
        "required": ["label"],
        "additionalProperties": False}},
    "$ref": "#/$defs/node",
}
EVENT = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 1, "maxLength": 30},
        "date": {"type": "string", "format": "date"},
        "priority": {"type": "integer", "enum": [1, 2, 3]},
        "optional_note": {"type": "string", "maxLength": 10},
    },
    "required": ["title", "date", "priority"],
    "additionalProperties": False,
}
SCHEMAS = [("person", PERSON, "Describe a person as JSON."),
           ("order", ORDER, "Write a shop order as JSON."),
           ("shape", SHAPE, "Give me a shape as JSON."),
           ("event", EVENT, "Plan an event as JSON.")]


def schema_body(model, name, schema, prompt, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.8, "max_tokens": 400,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": name, "schema": schema,
                                                "strict": True}}}
    body.update(extra)
    return body


@A.test
def fifty_schema_requests_validate():
    """50 requests at temperature 0.8 over the base and two adapters, four
    schemas (nested objects, enums, arrays, anyOf, a pattern, a format,
    type lists), sent concurrently: every output parses and validates, and
    none was cut short."""
    models = [base(), "r4-qv", "r8-od"]
    jobs = []
    for i in range(50):
        name, schema, prompt = SCHEMAS[i % len(SCHEMAS)]
        jobs.append((schema, schema_body(models[i % 3], name, schema, prompt, seed=i)))
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        outs = list(ex.map(lambda j: (j[0], chat(j[1])), jobs))
    for schema, obj in outs:
        ch = obj["choices"][0]
        assert ch["finish_reason"] == "stop", ch
        text = ch["message"]["content"]
        doc = json.loads(text)
        jsonschema.validate(doc, schema)


@A.test
def recursive_schema():
    """$ref recursion: a tree. Its depth is the model's choice, so an output
    cut short by max_tokens is possible; a finished one validates, and
    some finish."""
    done = 0
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        outs = list(ex.map(lambda seed: chat(schema_body(
            base(), "tree", TREE, "Write a tiny tree as JSON.", seed=seed, max_tokens=200)),
            range(6)))
    for obj in outs:
        ch = obj["choices"][0]
        if ch["finish_reason"] == "stop":
            jsonschema.validate(json.loads(ch["message"]["content"]), TREE)
            done += 1
        else:
            assert ch["message"]["content"].startswith("{"), ch
    assert done >= 1, done


@A.test
def json_object_gives_an_object():
    obj = chat({"model": base(), "messages": [{"role": "user", "content": "List three fruits."}],
                "temperature": 0.8, "seed": 3, "max_tokens": 300,
                "response_format": {"type": "json_object"}})
    ch = obj["choices"][0]
    if ch["finish_reason"] == "stop":
        assert isinstance(json.loads(ch["message"]["content"]), dict), ch
    else:  # an unbounded object may run out of tokens; it is still a prefix
        assert ch["message"]["content"].startswith("{"), ch


@A.test
def streaming_n_and_logprobs_under_a_constraint():
    """n = 3 streamed with logprobs: each choice's text validates, and every
    reported alternative is a token the constraint allowed (a finite
    logprob; the constrained distribution)."""
    body = schema_body(base(), "person", PERSON, "Describe a person as JSON.", n=3, seed=11,
                       stream=True, logprobs=True, top_logprobs=3)
    status, _, data = agent().request("POST", "/v1/chat/completions", body)
    assert status == 200, data
    events, done = A.sse_events(data)
    assert done
    texts, finish = {}, {}
    for ev in events:
        for ch in ev.get("choices", []):
            texts[ch["index"]] = texts.get(ch["index"], "") + (ch["delta"].get("content") or "")
            if ch.get("finish_reason"):
                finish[ch["index"]] = ch["finish_reason"]
            for lp in (ch.get("logprobs") or {}).get("content") or []:
                assert lp["logprob"] > -1e30, lp
                total = sum(2.718281828 ** t["logprob"] for t in lp["top_logprobs"])
                assert total <= 1.0001, lp
    assert sorted(texts) == [0, 1, 2] and all(f == "stop" for f in finish.values()), finish
    for t in texts.values():
        jsonschema.validate(json.loads(t), PERSON)


@A.test
def completions_take_response_format_too():
    got, obj = agent().json("POST", "/v1/completions", {
        "model": base(), "prompt": "A user record in JSON: ", "max_tokens": 200,
        "temperature": 0.8, "seed": 5,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "event", "schema": EVENT}}})
    assert got == 200, obj
    ch = obj["choices"][0]
    assert ch["finish_reason"] == "stop", ch
    jsonschema.validate(json.loads(ch["text"]), EVENT)


@A.test
def mixed_batch_leaves_unconstrained_requests_alone():
    """Greedy unconstrained requests over the base and two adapters give the
    same tokens alone and in a batch with constrained requests."""
    prompts = [("The capital of France is", None), ("Write a haiku about rain:", "r4-qv"),
               ("def fibonacci(n):", "r8-od"), ("Once upon a time", "r4-qv")]

    def plain(p, model):
        got, obj = agent().json("POST", "/v1/completions", {
            "model": model or base(), "prompt": p, "max_tokens": 24, "temperature": 0,
            "logprobs": 0})
        assert got == 200, obj
        return obj["choices"][0]["logprobs"]["tokens"]

    alone = [plain(p, m) for p, m in prompts]
    with concurrent.futures.ThreadPoolExecutor(12) as ex:
        cons = [(s, ex.submit(chat, schema_body(m, n, s, p, seed=i)))
                for i, ((n, s, p), m) in enumerate(zip(SCHEMAS * 2,
                                                       [base(), "r4-qv", "r8-od"] * 4))]
        mixed = [ex.submit(plain, p, m) for p, m in prompts]
        together = [f.result() for f in mixed]
        for schema, f in cons:
            jsonschema.validate(json.loads(f.result()["choices"][0]["message"]["content"]),
                                schema)
    assert together == alone, (together, alone)


@A.test
def openai_client_parse():
    """The official client's parse() with a pydantic model."""
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        country: str
        population: int

    client = agent().client()
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model=base(), messages=[{"role": "user", "content": "Tell me about Paris."}],
              response_format=City, temperature=0.8, seed=2, max_tokens=200)
    city = r.choices[0].message.parsed
    assert isinstance(city, City), r
    assert isinstance(city.population, int)


@A.test
def unsupported_keywords_are_refused_by_name():
    for schema, word in [({"type": "object", "properties": {"a": {"type": "integer",
                                                                  "multipleOf": 3}}},
                          "multipleOf"),
                         ({"type": "string", "not": {"const": "x"}}, "not"),
                         ({"type": "object", "patternProperties": {"^a": {}}},
                          "patternProperties")]:
        obj = chat(schema_body(base(), "x", schema, "hi"), status=400)
        err = obj["error"]
        assert err["param"] == "response_format.json_schema.schema", err
        assert word in err["message"], err
    obj = chat({"model": base(), "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "yaml"}}, status=400)
    assert obj["error"]["param"] == "response_format.type", obj
    obj = chat({"model": base(), "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "x", "schema": {"$ref": "#/$defs/missing"}}}}, status=400)
    assert "missing" in obj["error"]["message"], obj


def cleanup():
    failed = 0
    if _agent is not None:
        failed += A.stop_agent(_agent, "test-structured-output:shutdown")
    shutil.rmtree(TMP, ignore_errors=True)
    return failed


if __name__ == "__main__":
    A.main("test-structured-output", cleanup)
