#!/usr/bin/env python3
"""loraplane-agent as its users meet it: real agent processes on 127.0.0.1
(ports picked by the agent, read back from its log), the official `openai`
Python package and raw HTTP (http.client, which never retries), real model
files and adapter fixtures.

Covers startup (flags, environment, lora-dir with invalid entries, device
choice, usage errors), the OpenAI endpoints (models, completions, chat,
streaming, n, seeds, stop strings, logprobs, echo, token-id prompts), the
same greedy text as loraplane-generate, bad input (each with its status,
the agent serving afterwards), API keys, JSON logs, metrics, a client that
disconnects mid-stream (its KV blocks come back) and SIGTERM with a stream
in flight. Prints one PASS/FAIL line per test.

The Agent class and the runner live in harness.py."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from harness import *  # noqa: F401,F403 (Agent, test, run_tests, paths)


# ---- the tests ---------------------------------------------------------------

_tmp = None
_main = None  # the shared tiny agent


def tmpdir():
    global _tmp
    if _tmp is None:
        _tmp = tempfile.mkdtemp(prefix="lp-agent-test-")
    return _tmp


def main_agent():
    """A tiny-model agent with a lora-dir (two good adapters, two bad ones)
    and --lora-modules (a name with '/')."""
    global _main
    if _main is None:
        d = os.path.join(tmpdir(), "loras")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        copy_adapter(os.path.join(TINY_LORAS, "r4-qv"), os.path.join(d, "r4-qv"))
        copy_adapter(os.path.join(TINY_LORAS, "r8-all"), os.path.join(d, "r8-all"))
        copy_adapter(os.path.join(TINY_LORAS, "r64-mlp"), os.path.join(d, "too-big"))
        copy_adapter(os.path.join(TINY_LORAS, "r4-qv"), os.path.join(d, "bad name"))
        os.makedirs(os.path.join(d, "empty"))
        _main = Agent("--lora-dir", d, "--served-model-name", "tiny", "--max-lora-rank", "32",
                      "--lora-modules", "team/attn=" + os.path.join(TINY_LORAS, "r16-attn"),
                      json.dumps({"name": "nemo",
                                  "path": os.path.join(TINY_LORAS, "r8-all.nemo")}),
                      *TINY_ARGS)
    return _main


@test
def startup_logs_device_budget_adapters_addresses():
    a = main_agent()
    log = a.log()
    assert re.search(r"device: cpu, .*\('auto' chose the CPU: ", log), log
    assert re.search(r"memory on cpu \([\d.]+ GiB\): weights [\d.]+ MiB, LoRA slots and workspaces [\d.]+ MiB, "
                     r"activations [\d.]+ MiB, kv cache 8\.0 MiB \(f32, \d+ blocks of 16 tokens",
                     log), log
    assert re.search(r"limits: max-model-len 256", log), log
    for name in ("r4-qv", "r8-all", "team/attn", "nemo"):
        assert re.search(rf"loaded adapter '{re.escape(name)}' from '[^']+': \w", log), \
            f"no load line for {name}:\n{log}"
    assert re.search(r"skipped adapter 'too-big' .*rank", log), log
    assert re.search(r"skipped adapter 'bad name' .*character", log), log
    assert re.search(r"skipped adapter 'empty' ", log), log
    assert re.search(r"listening: api http://127\.0\.0\.1:\d+, admin http://127\.0\.0\.1:\d+", log)
    assert "the admin port has no token" in log, log


@test
def models_list_base_first_then_adapters():
    a = main_agent()
    models = a.client().models.list().data
    ids = [m.id for m in models]
    assert ids[0] == "tiny", ids
    assert sorted(ids[1:]) == sorted(["r4-qv", "r8-all", "team/attn", "nemo"]), ids
    raw = a.json("GET", "/v1/models")[1]["data"]
    assert raw[0]["parent"] is None and raw[0]["root"] == TINY and raw[0]["owned_by"] == "loraplane"
    for m in raw[1:]:
        assert m["parent"] == "tiny" and m["object"] == "model", m
        assert m["root"].startswith("file:///"), m
    assert [m for m in raw if m["id"] == "r4-qv"][0]["root"].endswith("/loras/r4-qv")


@test
def greedy_text_equals_generate_for_base_and_adapters():
    a = main_agent()
    c = a.client()
    for adapter, src in ((None, None), ("r4-qv", os.path.join(TINY_LORAS, "r4-qv")),
                         ("r8-all", os.path.join(TINY_LORAS, "r8-all"))):
        for prompt in ("Hello world", "The quick brown fox"):
            want = generate_text(TINY, prompt, adapter, src, max_tokens=24,
                                 extra=["--ignore-eos"])
            got = c.completions.create(model=adapter or "tiny", prompt=prompt, max_tokens=24,
                                       temperature=0, extra_body={"ignore_eos": True})
            assert got.choices[0].text == want["completion"], \
                f"{adapter} {prompt!r}: api {got.choices[0].text!r} vs generate {want['completion']!r}"
            assert got.usage.completion_tokens == 24 and got.choices[0].finish_reason == "length"
            assert got.usage.prompt_tokens == want["prompt_tokens"], got.usage
    base = c.completions.create(model="tiny", prompt="Hello world", max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    lora = c.completions.create(model="r8-all", prompt="Hello world", max_tokens=24,
                                temperature=0, extra_body={"ignore_eos": True}).choices[0].text
    assert base != lora, "the adapter changed nothing"


@test
def streaming_equals_whole_with_usage_chunk():
    a = main_agent()
    c = a.client()
    for model in ("tiny", "team/attn"):
        whole = c.completions.create(model=model, prompt="Once upon a time", max_tokens=20,
                                     temperature=0, extra_body={"ignore_eos": True})
        chunks = list(c.completions.create(model=model, prompt="Once upon a time", max_tokens=20,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        assert text == whole.choices[0].text, f"{text!r} vs {whole.choices[0].text!r}"
        finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and
                  ch.choices[0].finish_reason]
        assert finals == ["length"], finals
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20, chunks[-1]
        assert chunks[-1].usage.total_tokens == 20 + whole.usage.prompt_tokens
        assert all(ch.usage is None for ch in chunks[:-1])
    # the raw stream: data: lines, ending with [DONE]
    status, hdrs, data = a.request("POST", "/v1/completions",
                                   {"model": "tiny", "prompt": "x", "max_tokens": 5,
                                    "stream": True})
    assert status == 200 and hdrs["content-type"] == "text/event-stream", hdrs
    events, done = sse_events(data)
    assert done and events and events[0]["object"] == "text_completion"


@test
def chat_whole_and_streamed_first_chunk_has_role():
    a = main_agent()
    c = a.client()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    whole = c.chat.completions.create(model="r4-qv", messages=msgs, max_completion_tokens=12,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens == 12, whole.usage
    chunks = list(c.chat.completions.create(model="r4-qv", messages=msgs, max_tokens=12,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    assert all(ch.choices[0].delta.role is None for ch in chunks[1:])
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert text == whole.choices[0].message.content, (text, whole.choices[0].message.content)
    assert chunks[-1].choices[0].finish_reason == "length"
    # content as an array of text parts
    parts = c.chat.completions.create(
        model="r4-qv", max_tokens=12, temperature=0, extra_body={"ignore_eos": True},
        messages=[{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
                  {"role": "user", "content": [{"type": "text", "text": "hi there"}]}])
    assert parts.choices[0].message.content == whole.choices[0].message.content


@test
def prompt_forms_strings_token_ids_and_echo():
    a = main_agent()
    c = a.client()
    r = c.completions.create(model="tiny", prompt=["Hello", "Good night"], max_tokens=6,
                             temperature=0, extra_body={"ignore_eos": True})
    assert [ch.index for ch in r.choices] == [0, 1], r.choices
    single = [c.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0,
                                   extra_body={"ignore_eos": True}).choices[0].text
              for p in ("Hello", "Good night")]
    assert [ch.text for ch in r.choices] == single
    ids = [1, 100, 200, 300, 42]
    r = c.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 5, r.usage
    r2 = c.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    assert len(r2.choices) == 2 and r2.choices[0].text == r.choices[0].text
    assert r2.usage.prompt_tokens == 8
    e = c.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, echo=True,
                             extra_body={"ignore_eos": True})
    assert e.choices[0].text == "Hello" + single[0], e.choices[0].text


@test
def n_choices_seed_and_sampling_fields():
    a = main_agent()
    c = a.client()
    kw = dict(model="tiny", prompt="Once", max_tokens=16, temperature=1.0, top_p=0.9,
              extra_body={"ignore_eos": True, "top_k": 50, "min_p": 0.01,
                          "repetition_penalty": 1.1},
              presence_penalty=0.5, frequency_penalty=0.2)
    r = c.completions.create(n=3, seed=11, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 48
    texts = [ch.text for ch in r.choices]
    assert len(set(texts)) > 1, f"3 sampled choices are identical: {texts}"
    again = c.completions.create(n=3, seed=11, **kw)
    assert [ch.text for ch in again.choices] == texts, "same seed, different text"
    other = c.completions.create(n=3, seed=12, **kw)
    assert [ch.text for ch in other.choices] != texts, "different seeds, same text"
    chat = c.chat.completions.create(model="tiny", n=2, messages=[{"role": "user", "content": "a"}],
                                     max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    assert [ch.index for ch in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content


@test
def stop_strings_end_the_text():
    a = main_agent()
    c = a.client()
    full = c.completions.create(model="tiny", prompt="Hello world", max_tokens=40, temperature=0,
                                extra_body={"ignore_eos": True}).choices[0].text
    cut = None
    for i in range(4, len(full) - 3):
        if "\ufffd" not in full[i:i + 3] and full[i:i + 3].strip():
            cut = full[i:i + 3]
            break
    assert cut, full
    want = full[:full.index(cut)]
    for stop in (cut, [cut, "zzzz-not-there"]):
        r = c.completions.create(model="tiny", prompt="Hello world", max_tokens=40,
                                 temperature=0, stop=stop, extra_body={"ignore_eos": True})
        assert r.choices[0].text == want and r.choices[0].finish_reason == "stop", \
            (r.choices[0].text, want, cut)
        assert r.usage.completion_tokens < 40
    chunks = list(c.completions.create(model="tiny", prompt="Hello world", max_tokens=40,
                                       temperature=0, stop=cut, stream=True,
                                       extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


@test
def logprobs_completions_and_chat():
    a = main_agent()
    c = a.client()
    r = c.completions.create(model="r4-qv", prompt="Hello", max_tokens=8, temperature=0,
                             logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 8 and len(lp.token_logprobs) == 8 and len(lp.text_offset) == 8
    assert all(x <= 0 for x in lp.token_logprobs), lp.token_logprobs
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3, top
        # greedy: the chosen token is the most likely one
        assert abs(max(top.values()) - tlp) < 1e-4, (tok, tlp, top)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    ch = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hey"}],
                                   max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                   extra_body={"ignore_eos": True})
    content = ch.choices[0].logprobs.content
    assert len(content) == 5, content
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2 and isinstance(e.bytes, list)
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4
    chunks = list(c.chat.completions.create(model="tiny", stream=True, max_tokens=5,
                                            temperature=0, logprobs=True, top_logprobs=1,
                                            messages=[{"role": "user", "content": "hey"}],
                                            extra_body={"ignore_eos": True}))
    streamed = [e for chk in chunks for e in ((chk.choices[0].logprobs.content or [])
                                              if chk.choices and chk.choices[0].logprobs else [])]
    assert [e.token for e in streamed] == [e.token for e in content]


@test
def unknown_model_is_404_never_the_base():
    import openai
    a = main_agent()
    c = a.client()
    for call in (lambda: c.completions.create(model="nope", prompt="x", max_tokens=2),
                 lambda: c.chat.completions.create(model="r4-qv/../tiny", max_tokens=2,
                                                   messages=[{"role": "user", "content": "x"}]),
                 lambda: c.completions.create(model="TINY", prompt="x", max_tokens=2)):
        try:
            call()
            raise AssertionError("no error for an unknown model")
        except openai.NotFoundError as e:
            assert e.code == "model_not_found" and e.param == "model", e.body


@test
def bad_fields_through_the_openai_client():
    import openai
    a = main_agent()
    c = a.client()
    cases = [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=10 ** 9), "max_tokens"),
        (dict(temperature=7), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(n=0), "n"),
        (dict(logprobs=99), "logprobs"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(stop=[""]), "stop"),
        (dict(extra_body={"top_k": -5}), "top_k"),
        (dict(extra_body={"min_p": 2}), "min_p"),
        (dict(extra_body={"ignore_eos": "yes"}), "ignore_eos"),
        (dict(seed="7"), "seed"),
    ]
    for kw, param in cases:
        try:
            c.completions.create(model="tiny", prompt="x", **kw)
            raise AssertionError(f"{kw}: accepted")
        except openai.BadRequestError as e:
            assert e.param == param, f"{kw}: param {e.param!r}, body {e.body}"
    try:
        c.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "x"}])
        raise AssertionError("an unknown role accepted")
    except openai.BadRequestError as e:
        assert e.param == "messages[0].role", e.body
    try:  # a tool result must say which call it answers
        c.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x"}])
        raise AssertionError("a tool message without tool_call_id accepted")
    except openai.BadRequestError as e:
        assert e.param == "messages[0].tool_call_id", e.body


def too_long_prompt():
    return "hello " * 400  # far more than the tiny model's 256 tokens


@test
def bad_inputs_each_get_their_status_and_the_agent_keeps_serving():
    a = main_agent()
    big = b'{"model": "tiny", "prompt": "' + b"a" * (5 << 20) + b'"}'
    C, CH = "/v1/completions", "/v1/chat/completions"
    ok = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    cases = [
        ("malformed JSON", C, b'{"model": tiny}', 400, None),
        ("truncated JSON", C, b'{"model": "tiny", "prompt": "ab', 400, None),
        ("body is an array", C, b'[1, 2, 3]', 400, None),
        ("empty body", C, b"", 400, None),
        ("deeply nested JSON", C, b"[" * 100000, 400, None),
        ("number out of range", C, b'{"model": "tiny", "prompt": "x", "max_tokens": 1e999}', 400,
         None),
        ("NUL escape in a string", C, b'{"model": "tiny", "prompt": "a\\u0000b"}', 400, None),
        ("lone surrogate escape", C, b'{"model": "tiny", "prompt": "a\\ud800"}', 400, None),
        ("invalid UTF-8", C, b'{"model": "tiny", "prompt": "caf\xe9"}', 400, None),
        ("missing model", C, {"prompt": "x"}, 400, "model"),
        ("model not a string", C, {"model": 7, "prompt": "x"}, 400, "model"),
        ("unknown model", C, {"model": "ghost", "prompt": "x"}, 404, "model"),
        ("missing prompt", C, {"model": "tiny"}, 400, "prompt"),
        ("prompt an object", C, {"model": "tiny", "prompt": {"a": 1}}, 400, "prompt"),
        ("prompt mixed array", C, {"model": "tiny", "prompt": ["a", 1]}, 400, "prompt"),
        ("empty prompt array", C, {"model": "tiny", "prompt": []}, 400, "prompt"),
        ("token id out of range", C, {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
        ("negative token id", C, {"model": "tiny", "prompt": [-1]}, 400, "prompt"),
        ("negative max_tokens", C, dict(ok, max_tokens=-5), 400, "max_tokens"),
        ("zero max_tokens", C, dict(ok, max_tokens=0), 400, "max_tokens"),
        ("absurd max_tokens", C, dict(ok, max_tokens=2 ** 62), 400, "max_tokens"),
        ("max_tokens a string", C, dict(ok, max_tokens="5"), 400, "max_tokens"),
        ("max_tokens a float", C, dict(ok, max_tokens=2.5), 400, "max_tokens"),
        ("prompt longer than the context", C, dict(ok, prompt=too_long_prompt()), 400, "prompt"),
        ("prompt + max_tokens over the context", C,
         dict(ok, prompt="hello " * 40, max_tokens=250), 400, "max_tokens"),
        ("negative temperature", C, dict(ok, temperature=-1), 400, "temperature"),
        ("temperature not a number", C, dict(ok, temperature="hot"), 400, "temperature"),
        ("top_p above 1", C, dict(ok, top_p=1.5), 400, "top_p"),
        ("n too large", C, dict(ok, n=1000), 400, "n"),
        ("stop not a string", C, dict(ok, stop=5), 400, "stop"),
        ("too many stops", C, dict(ok, stop=[str(i) for i in range(17)]), 400, "stop"),
        ("stream not a bool", C, dict(ok, stream="yes"), 400, "stream"),
        ("stream_options without stream", C, dict(ok, stream_options={"include_usage": True}),
         400, "stream_options"),
        ("echo with logprobs", C, dict(ok, echo=True, logprobs=1), 400, "echo"),
        ("logit_bias", C, dict(ok, logit_bias={"5": 101}), 400, "logit_bias"),
        ("chat: missing messages", CH, {"model": "tiny"}, 400, "messages"),
        ("chat: empty messages", CH, {"model": "tiny", "messages": []}, 400, "messages"),
        ("chat: message not an object", CH, {"model": "tiny", "messages": ["hi"]}, 400,
         "messages[0]"),
        ("chat: bad role", CH, {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
         400, "messages[0].role"),
        ("chat: image part", CH, {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
         "messages[0].content"),
        ("chat: content a number", CH, {"model": "tiny", "messages": [
            {"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ("chat: top_logprobs without logprobs", CH, {"model": "tiny", "top_logprobs": 2,
                                                     "messages": [{"role": "user",
                                                                   "content": "x"}]}, 400,
         "top_logprobs"),
        ("chat: tools", CH, {"model": "tiny", "tools": [{"type": "function"}],
                             "messages": [{"role": "user", "content": "x"}]}, 400,
         "tools[0].function"),
        ("chat: prompt longer than the context", CH, {"model": "tiny", "messages": [
            {"role": "user", "content": too_long_prompt()}]}, 400, "messages"),
        ("body over the limit", C, big, 413, None),
        ("unknown route", "/v1/embeddings", ok, 404, None),
        ("vLLM endpoint on the public port without the flag", "/v1/load_lora_adapter",
         {"lora_name": "x", "lora_path": "/tmp"}, 404, None),
        ("admin route on the public port", "/v1/loras", {}, 404, None),
    ]
    problems = []
    for name, path, body, status, param in cases:
        got, hdrs, data = a.request("POST", path, body)
        try:
            err = json.loads(data)["error"]
        except (ValueError, KeyError, TypeError):
            problems.append(f"{name}: not an error body: {data[:200]!r}")
            continue
        if got != status:
            problems.append(f"{name}: status {got}, want {status}: {err}")
        if set(err) != {"message", "type", "param", "code"} or not err["message"]:
            problems.append(f"{name}: bad error shape {err}")
        if param is not None and err["param"] != param:
            problems.append(f"{name}: param {err['param']!r}, want {param!r} ({err['message']})")
        if not a.serving():
            problems.append(f"{name}: the agent stopped serving")
            break
    got, hdrs, _ = a.request("DELETE", "/v1/completions")
    if got != 405 or "POST" not in hdrs.get("allow", ""):
        problems.append(f"wrong method: {got} {hdrs}")
    assert not problems, "\n".join(problems)
    assert len(cases) >= 25
    # context length errors carry their code
    _, obj = a.json("POST", C, dict(ok, prompt=too_long_prompt()))
    assert obj["error"]["code"] == "context_length_exceeded", obj
    assert a.proc.poll() is None


@test
def metrics_count_requests_tokens_and_latency():
    a = main_agent()
    c = a.client()
    c.completions.create(model="r8-all", prompt="metrics", max_tokens=7, temperature=0,
                         extra_body={"ignore_eos": True})
    m = a.metrics()
    assert m['loraplane_requests_total{model="r8-all",status="200"}'] >= 1, m
    assert m['loraplane_generation_tokens_total{model="r8-all"}'] >= 7
    assert m['loraplane_prompt_tokens_total{model="r8-all"}'] >= 1
    assert m["loraplane_time_to_first_token_seconds_count"] >= 1
    assert m["loraplane_inter_token_latency_seconds_count"] >= 6
    assert m['loraplane_inter_token_latency_seconds_bucket{le="+Inf"}'] == \
        m["loraplane_inter_token_latency_seconds_count"]
    assert m['loraplane_requests_total{model="unknown",status="404"}'] >= 1, m
    assert m["loraplane_kv_blocks_total"] > 0 and m["loraplane_kv_blocks_used"] == 0
    assert m["loraplane_requests_running"] == 0 and m["loraplane_requests_waiting"] == 0
    assert m["loraplane_adapter_loads_total"] >= 4
    assert sum(v for k, v in m.items() if k.startswith("loraplane_adapters{")) == 4
    assert 'loraplane_adapter_cache_hits_total{tier="host"}' in m
    assert 'loraplane_adapter_evictions_total{tier="device"}' in m
    assert m["loraplane_ready"] == 1
    for path in ("/health", "/ready"):
        for admin in (False, True):
            status, obj = a.json("GET", path, admin=admin)
            assert status == 200, (path, admin, obj)


@test
def api_key_required_on_the_public_port():
    import openai
    keyfile = os.path.join(tmpdir(), "api-key")
    with open(keyfile, "w") as f:
        f.write("s3cret-key\n")
    with Agent("--api-key-file", keyfile, *TINY_ARGS) as a:
        for token in (None, "wrong", "s3cret-key-and-more", ""):
            status, hdrs, data = a.request("GET", "/v1/models", token=token)
            assert status == 401, (token, status, data)
            assert json.loads(data)["error"]["type"] == "authentication_error"
        status, _, _ = a.request("GET", "/v1/models", headers={"Authorization": "Basic abc"})
        assert status == 401
        try:
            a.client(api_key="wrong").models.list()
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError:
            pass
        r = a.client(api_key="s3cret-key").completions.create(model="tiny-llama", prompt="x",
                                                              max_tokens=2)
        assert r.choices[0].text is not None
        assert a.request("GET", "/health")[0] == 200 and a.request("GET", "/ready")[0] == 200


@test
def device_and_usage_errors_exit_with_clear_messages():
    # no GPU here: which reason depends on the build (test-device.py
    # checks each); every one names the way out
    reasons = ("no CUDA backend", "no usable NVIDIA driver", "cannot open shared object")
    rc, out = run_agent_once("--model", TINY, "--device", "cuda", "--port", "0",
                             "--admin-port", "0")
    assert rc == 1 and any(r in out for r in reasons) and "--device cpu" in out, (rc, out)
    rc, out = run_agent_once("--model", TINY, "--device", "cuda:1")
    assert rc == 1 and any(r in out for r in reasons), (rc, out)
    rc, out = run_agent_once("--model", TINY, "--device", "tpu")
    assert rc == 2 and "'--device'" in out, (rc, out)
    rc, out = run_agent_once("--port", "0")
    assert rc == 2 and "'--model' is required" in out, (rc, out)
    rc, out = run_agent_once("--model", TINY, "--port", "99999")
    assert rc == 2 and "'--port'" in out, (rc, out)
    rc, out = run_agent_once("--model", TINY, "--bogus-flag")
    assert rc == 2, (rc, out)
    rc, out = run_agent_once("--model", TINY, "--max-queued-requests", "0")
    assert rc == 2 and "'--max-queued-requests'" in out, (rc, out)
    rc, out = run_agent_once("--model", "/nonexistent/model", "--port", "0", "--admin-port", "0")
    assert rc == 1 and "/nonexistent/model" in out, (rc, out)
    rc, out = run_agent_once("--model", TINY, "--port", "0", "--admin-port", "0", *TINY_ARGS,
                             "--lora-modules", "x=/nonexistent/adapter")
    assert rc == 1 and "adapter 'x'" in out and "does not exist" in out, (rc, out)
    rc, out = run_agent_once("--model", TINY, "--port", "0", "--admin-port", "0", *TINY_ARGS,
                             "--api-key-file", "/nonexistent/key")
    assert rc == 1 and "/nonexistent/key" in out, (rc, out)
    # a port in use
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        rc, out = run_agent_once("--model", TINY, "--host", "127.0.0.1", "--port",
                                 str(s.getsockname()[1]), "--admin-port", "0", *TINY_ARGS)
        assert rc == 1 and "cannot start the public server" in out, (rc, out)
    finally:
        s.close()
    check_clean(out)


@test
def environment_variables_and_json_logs():
    d = os.path.join(tmpdir(), "env-loras")
    os.makedirs(d)
    copy_adapter(os.path.join(TINY_LORAS, "r4-qv"), os.path.join(d, "small"))
    copy_adapter(os.path.join(TINY_LORAS, "r8-all"), os.path.join(d, "rank8"))
    env = {"LORAPLANE_MODEL": TINY, "NIM_PEFT_SOURCE": d, "NIM_MAX_LORA_RANK": "4",
           "LORAPLANE_SERVED_MODEL_NAME": "from-env", "LORAPLANE_LOG_FORMAT": "json"}
    with Agent(*TINY_ARGS, env=env, model=None) as a:
        status, obj = a.json("GET", "/v1/models")
        assert [m["id"] for m in obj["data"]] == ["from-env", "small"], obj
        status, hdrs, _ = a.request("GET", "/v1/models", headers={"X-Request-Id": "trace-42"})
        assert hdrs["x-request-id"] == "trace-42"
        a.wait_log(r'"request_id":"trace-42"')
        lines = a.log().splitlines()
        recs = [json.loads(line) for line in lines]  # every line is one JSON object
        assert all({"ts", "level", "msg"} <= set(r) for r in recs), recs[:3]
        skipped = [r for r in recs if "skipped adapter 'rank8'" in r["msg"]]
        assert skipped and "rank" in skipped[0]["msg"] and skipped[0]["level"] == "warn", recs
        # generated ids differ per request
        ids = {a.request("GET", "/health")[1]["x-request-id"] for _ in range(3)}
        assert len(ids) == 3, ids


# ---- SmolLM2: chat parity, disconnects, SIGTERM ----------------------------------

_smol = None


def smol_agent():
    global _smol
    if _smol is None:
        # one adapter in host memory at a time: the tier-full test needs it
        _smol = Agent("--lora-modules", "smol-qv=" + os.path.join(SMOL_LORAS, "r4-qv"),
                      "--max-cpu-loras", "1", "--max-loras", "1", "--allowed-local-roots",
                      os.path.realpath(SMOL_LORAS), *SMOL_ARGS, model=MODEL)
    return _smol


@test
def smollm2_chat_matches_generate_chat():
    a = smol_agent()
    c = a.client()
    q = "What is the capital of France?"
    for adapter in (None, "smol-qv"):
        want = generate_text(MODEL, q, adapter, os.path.join(SMOL_LORAS, "r4-qv"),
                             max_tokens=24, chat=True,
                             extra=["--max-model-len", "1024", "--kv-cache-bytes",
                                    str(96 << 20)])
        got = c.chat.completions.create(model=adapter or "smollm2-135m-instruct-q4_1",
                                        messages=[{"role": "user", "content": q}],
                                        max_tokens=24, temperature=0)
        assert got.choices[0].message.content == want["completion"], \
            (adapter, got.choices[0].message.content, want["completion"])
        assert got.choices[0].finish_reason == want["finish_reason"]
    assert "Paris" in want["completion"] or "Paris" in got.choices[0].message.content


@test
def full_adapter_tier_gives_429_with_retry_after_and_507_on_load():
    a = smol_agent()
    od = "file://" + os.path.realpath(os.path.join(SMOL_LORAS, "r8-od"))
    status, obj = a.json("POST", "/v1/loras", {"lora_name": "smol-od", "source": {"uri": od}},
                         admin=True)
    assert status == 201, (status, obj)
    body = {"model": "smol-qv", "prompt": "Tell me a story.", "max_tokens": 600,
            "ignore_eos": True}
    # smol-qv holds the only host slot while its request runs
    st = Stream(a, body)
    st.wait_started()
    status, hdrs, data = a.request("POST", "/v1/completions",
                                   {"model": "smol-od", "prompt": "x", "max_tokens": 2})
    assert status == 429, (status, data)
    assert json.loads(data)["error"]["code"] == "adapter_tier_full", data
    assert hdrs.get("retry-after") == "1", hdrs
    # an install needs the engine's lock, which its thread holds for every
    # step (see the report on worker.c): a load may only get it once the
    # stream is over; then it is undone and tried again with a new stream
    seen = []
    for attempt in range(4):
        if st.done.is_set():
            st = Stream(a, body)
            st.wait_started()
        status, obj = a.json("POST", "/v1/loras", {"lora_name": "smol-od2", "source": {
            "uri": od}}, admin=True)
        seen.append(status)
        if status == 507:
            assert obj["error"]["code"] == "no_room", obj
            break
        assert status == 201 and st.done.is_set(), (status, obj)
        assert a.json("DELETE", "/v1/loras/smol-od2", admin=True)[0] == 200
    assert seen[-1] == 507, f"no 507 in {len(seen)} tries: {seen}"
    status, data = st.join()
    assert status == 200 and sse_events(data)[1]
    # with the tier free again, the other adapter serves
    r = a.json("POST", "/v1/completions", {"model": "smol-od", "prompt": "x", "max_tokens": 2})
    assert r[0] == 200, r
    assert a.json("DELETE", "/v1/loras/smol-od", admin=True)[0] == 200


@test
def full_submit_queue_gives_429_queue_full_and_loses_nothing():
    # room for one request between the HTTP threads and the engine thread;
    # a 900-token prefill in one step holds the engine thread for a second
    # or more (1 thread), and the requests sent meanwhile wait in the queue
    with Agent("--max-queued-requests", "1", "--max-batched-tokens", "1024", *SMOL_ARGS,
               model=MODEL) as a:
        long_prompt = "the quick brown fox jumps over the lazy dog " * 100
        name = a.base_name()
        results = {}

        def send(key, body):
            results[key] = a.request("POST", "/v1/completions", body)

        first = threading.Thread(target=send, args=("long", {
            "model": name, "prompt": long_prompt, "max_tokens": 1}))
        first.start()
        time.sleep(0.3)
        others = [threading.Thread(target=send, args=(i, {
            "model": name, "prompt": "Hi", "max_tokens": 2})) for i in range(4)]
        for t in others:
            t.start()
        for t in [first, *others]:
            t.join(120)
        assert results["long"][0] == 200, results["long"]
        statuses = [results[i][0] for i in range(4)]
        print(f"  the 4 requests sent during the long step got {statuses}", flush=True)
        assert 429 in statuses and set(statuses) <= {200, 429}, statuses
        for i in range(4):
            status, hdrs, data = results[i]
            if status == 429:
                err = json.loads(data)["error"]
                assert err["code"] == "queue_full" and "overloaded" in err["message"], err
                assert hdrs.get("retry-after") == "1", hdrs
            else:
                assert json.loads(data)["choices"][0]["text"], data
        # the queue drains: the next request is served
        status, obj = a.json("POST", "/v1/completions",
                             {"model": name, "prompt": "Hi", "max_tokens": 2})
        assert status == 200, (status, obj)


@test
def client_disconnect_mid_stream_frees_kv_blocks():
    a = smol_agent()
    m0 = a.metrics()
    conn = a.conn()
    body = json.dumps({"model": "smol-qv", "prompt": "Tell me a long story.", "max_tokens": 900,
                       "ignore_eos": True, "stream": True})
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    assert r.fp.readline(), "no stream"  # the first chunk: the request is running
    t0 = time.time()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    while time.time() - t0 < 10:
        m = a.metrics()
        if m["loraplane_kv_blocks_used"] == 0 and m["loraplane_requests_running"] == 0:
            break
        time.sleep(0.05)
    freed = time.time() - t0
    assert m["loraplane_kv_blocks_used"] == 0 and m["loraplane_requests_running"] == 0, m
    # 900 tokens take several seconds on this model; the engine stopped early
    generated = m["loraplane_engine_generated_tokens_total"] - \
        m0["loraplane_engine_generated_tokens_total"]
    assert generated < 300, f"the engine generated {generated} tokens after the disconnect"
    assert freed < 5, f"blocks freed only after {freed:.1f}s"
    assert m["loraplane_client_disconnects_total"] == \
        m0.get("loraplane_client_disconnects_total", 0) + 1, m
    assert m['loraplane_requests_total{model="smol-qv",status="499"}'] >= 1, m
    a.wait_log(r"client went away: cancelling 1 sequence")
    assert a.serving()


@test
def sigterm_lets_the_running_stream_finish_then_exits_0():
    a = smol_agent()
    st = Stream(a, {"model": "smol-qv", "prompt": "Count to ten.", "max_tokens": 120,
                    "ignore_eos": True})
    st.wait_started()
    a.proc.send_signal(signal.SIGTERM)
    a.wait_log(r"received SIGTERM")
    # while it drains: not ready, and new work is refused
    status, obj = a.json("POST", "/v1/completions", {"model": "smol-qv", "prompt": "x"})
    assert status == 503 and obj["error"]["code"] == "not_ready", (status, obj)
    assert a.request("GET", "/ready")[0] == 503
    assert not st.done.is_set(), "the stream ended before the test could look"
    status, data = st.join()
    rc = a.stop()
    assert rc == 0, rc
    assert status == 200
    events, done = sse_events(data)
    assert done, "the stream was cut"
    assert events[-1]["choices"][0]["finish_reason"] == "length", events[-1]
    assert sum(1 for e in events if e["choices"][0]["text"]) > 50
    assert "stopped" in a.log()
    try:
        a.request("GET", "/health")
        raise AssertionError("still accepting after SIGTERM")
    except OSError:
        pass


if __name__ == "__main__":
    failed = 0
    try:
        failed = run_tests("test-agent")
    finally:
        for agent in (_main, _smol):
            failed += stop_agent(agent, "test-agent:shutdown")
        if _tmp:
            shutil.rmtree(_tmp, ignore_errors=True)
    sys.exit(1 if failed else 0)
