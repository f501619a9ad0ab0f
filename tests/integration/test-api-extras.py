#!/usr/bin/env python3
"""The OpenAI/vLLM API pieces clients reach for beyond completions (issue
12), against real agents on 127.0.0.1: POST /tokenize and /detokenize
(vLLM's shapes, the adapter chosen by `model`, the same tokens the
generation endpoints use), GET /v1/models/{id} (with the official openai
client's models.retrieve, names holding '/'), logit_bias on completions and
chat (a ban changes the greedy text, +100 forces a token, bad maps are 400
naming the field), HEAD on every GET route (through the front door's fast
path and through civetweb, with curl -I and on one kept-alive connection),
and the raw bytes of chat logprobs for tokens that hold part of a UTF-8
character (an emoji reply's bytes join into its text). Prints one PASS/FAIL
line per test."""

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse

import harness as A

KEY = "extras-key"
TMP = tempfile.mkdtemp(prefix="lp-api-extras-")
_smol = None


def smol():
    """The SmolLM2 agent (byte-level BPE: emoji split into byte tokens),
    with an API key and two adapters, one named with a '/'."""
    global _smol
    if _smol is None:
        keyfile = os.path.join(TMP, "key")
        with open(keyfile, "w") as f:
            f.write(KEY + "\n")
        _smol = A.Agent("--api-key-file", keyfile, "--lora-modules",
                        "r4-qv=" + os.path.join(A.SMOL_LORAS, "r4-qv"),
                        "team/sql:v2=" + os.path.join(A.SMOL_LORAS, "r8-od"), *A.SMOL_ARGS,
                        model=A.MODEL)
    return _smol


def call(method, path, body=None, token=KEY, admin=False):
    return smol().json(method, path, body, admin=admin, token=token)


def base():
    status, obj = call("GET", "/v1/models")
    assert status == 200, obj
    return obj["data"][0]["id"]


def tokenize(body, status=200):
    got, obj = call("POST", "/tokenize", body)
    assert got == status, (body, got, obj)
    return obj


def expect_error(method, path, body, status, param, code=None):
    got, obj = call(method, path, body)
    assert got == status, (body, got, obj)
    err = obj["error"]
    assert err["param"] == param, (body, err)
    if code:
        assert err["code"] == code, (body, err)
    return err["message"]


# ---- /tokenize and /detokenize ----------------------------------------------


@A.test
def tokenize_matches_what_generation_counts():
    m = base()
    text = "The capital of France is Paris. Naïve café 😀"
    obj = tokenize({"model": m, "prompt": text})
    assert set(obj) == {"count", "max_model_len", "tokens"}, obj
    assert obj["count"] == len(obj["tokens"]) and obj["max_model_len"] == 1024, obj
    status, comp = call("POST", "/v1/completions",
                        {"model": m, "prompt": text, "max_tokens": 1, "temperature": 0})
    assert status == 200 and comp["usage"]["prompt_tokens"] == obj["count"], (comp, obj)
    # the ids are a prompt the completions endpoint takes as is
    status, comp2 = call("POST", "/v1/completions", {"model": m, "prompt": obj["tokens"],
                                                     "max_tokens": 1, "temperature": 0})
    assert status == 200 and comp2["choices"][0]["text"] == comp["choices"][0]["text"], comp2
    # chat: the rendered template, as chat completions count it
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋"}]
    chat = tokenize({"model": m, "messages": msgs})
    status, cc = call("POST", "/v1/chat/completions",
                      {"model": m, "messages": msgs, "max_tokens": 1, "temperature": 0})
    assert status == 200 and cc["usage"]["prompt_tokens"] == chat["count"], (cc, chat)
    # without the generation prompt the assistant's header is missing
    bare = tokenize({"model": m, "messages": msgs, "add_generation_prompt": False})
    assert bare["tokens"] == chat["tokens"][:bare["count"]] and bare["count"] < chat["count"]
    status, tail = call("POST", "/detokenize", {"model": m,
                                                "tokens": chat["tokens"][bare["count"]:]})
    assert status == 200 and tail["prompt"] == "<|im_start|>assistant\n", tail


@A.test
def tokenize_token_strs_and_detokenize_round_trip():
    m = base()
    text = "Hello world, ünïcödé and 🎉 emoji"
    obj = tokenize({"model": m, "prompt": text, "return_token_strs": True,
                    "add_special_tokens": False})
    assert len(obj["token_strs"]) == obj["count"], obj
    # vocabulary strings, as HF's convert_ids_to_tokens gives them
    assert obj["token_strs"][:2] == ["Hello", "Ġworld"], obj["token_strs"]
    status, back = call("POST", "/detokenize", {"model": m, "tokens": obj["tokens"]})
    assert status == 200 and back == {"prompt": text}, back
    # the model is optional, as in vLLM, and an adapter tokenizes as the base
    assert tokenize({"prompt": text, "add_special_tokens": False})["tokens"] == obj["tokens"]
    for name in ("r4-qv", "team/sql:v2"):
        got = tokenize({"model": name, "prompt": text, "add_special_tokens": False})
        assert got["tokens"] == obj["tokens"], (name, got)
    status, back = call("POST", "/detokenize", {"tokens": []})
    assert status == 200 and back == {"prompt": ""}, back
    # special tokens are written out
    ids = tokenize({"prompt": "<|im_start|>user", "add_special_tokens": False})["tokens"]
    status, back = call("POST", "/detokenize", {"tokens": ids})
    assert back == {"prompt": "<|im_start|>user"} and len(ids) == 2, (ids, back)


@A.test
def tokenize_adds_special_tokens_as_asked():
    """On the tiny Llama model, whose tokenizer adds a BOS: completion style
    adds it by default, chat style only when asked (the template has its
    own)."""
    with A.Agent(*A.TINY_ARGS) as a:
        def tok(body):
            status, obj = a.json("POST", "/tokenize", body)
            assert status == 200, obj
            return obj["tokens"]

        plain = tok({"prompt": "Hello world"})
        bare = tok({"prompt": "Hello world", "add_special_tokens": False})
        assert plain[0] == 1 and plain[1:] == bare, (plain, bare)
        msgs = [{"role": "user", "content": "Hi"}]
        chat = tok({"messages": msgs})
        assert chat[0] == 1 and chat[1] != 1, chat
        assert tok({"messages": msgs, "add_special_tokens": True}) == [1] + chat


@A.test
def tokenize_refusals():
    m = base()
    expect_error("POST", "/tokenize", {"model": "no-such", "prompt": "x"}, 404, "model",
                 "model_not_found")
    expect_error("POST", "/detokenize", {"model": "no-such", "tokens": [1]}, 404, "model",
                 "model_not_found")
    expect_error("POST", "/tokenize", {"model": 5, "prompt": "x"}, 400, "model")
    expect_error("POST", "/tokenize", {"model": m}, 400, "prompt")
    expect_error("POST", "/tokenize", {"model": m, "prompt": ["a"]}, 400, "prompt")
    expect_error("POST", "/tokenize",
                 {"model": m, "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
                 400, "prompt")
    expect_error("POST", "/tokenize", {"model": m, "messages": []}, 400, "messages")
    expect_error("POST", "/tokenize", {"model": m, "messages": [{"role": "robot",
                                                                 "content": "x"}]},
                 400, "messages[0].role")
    expect_error("POST", "/tokenize", {"model": m, "prompt": "x", "add_special_tokens": "yes"},
                 400, "add_special_tokens")
    expect_error("POST", "/tokenize", {"model": m, "messages": [{"role": "user", "content": "x"}],
                                       "continue_final_message": True},
                 400, "continue_final_message")
    msg = expect_error("POST", "/detokenize", {"model": m, "tokens": [1, 49152]}, 400, "tokens")
    assert "outside the vocabulary (0 to 49151)" in msg, msg
    expect_error("POST", "/detokenize", {"model": m, "tokens": [-1]}, 400, "tokens")
    expect_error("POST", "/detokenize", {"model": m, "tokens": ["1"]}, 400, "tokens")
    expect_error("POST", "/detokenize", {"model": m, "tokens": "1 2"}, 400, "tokens")
    expect_error("POST", "/detokenize", {"model": m}, 400, "tokens")
    # the API key, as on /v1
    for path, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})):
        status, obj = call("POST", path, body, token=None)
        assert status == 401, (path, status, obj)
        status, obj = call("POST", path, body, token="wrong")
        assert status == 401, (path, status, obj)
    status, obj = call("GET", "/tokenize")
    assert status == 405, obj
    # still serving
    status, obj = call("POST", "/v1/completions", {"model": m, "prompt": "ok", "max_tokens": 1})
    assert status == 200, obj


# ---- GET /v1/models/{id} ----------------------------------------------------


@A.test
def model_retrieve_gives_the_listed_card():
    import openai
    status, listed = call("GET", "/v1/models")
    assert status == 200, listed
    cards = {c["id"]: c for c in listed["data"]}
    assert {"r4-qv", "team/sql:v2"} <= set(cards), cards
    for mid, card in cards.items():
        status, got = call("GET", "/v1/models/" + mid)
        assert status == 200 and got == card, (mid, got, card)
        status, got = call("GET", "/v1/models/" + urllib.parse.quote(mid, safe=""))
        assert status == 200 and got == card, (mid, got, card)
    # the admin port serves it too
    status, got = call("GET", "/v1/models/r4-qv", token=None, admin=True)
    assert status == 200 and got == cards["r4-qv"], got
    client = smol().client(api_key=KEY)
    for mid in (base(), "r4-qv", "team/sql:v2"):
        m = client.models.retrieve(mid)
        assert m.id == mid and m.object == "model" and m.owned_by == "loraplane", m
    try:
        client.models.retrieve("no-such")
        raise AssertionError("an unknown model was retrieved")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found" and e.body["param"] == "model", e.body
    status, obj = call("GET", "/v1/models/team")  # a prefix of a name is no name
    assert status == 404 and obj["error"]["code"] == "model_not_found", obj
    status, obj = call("GET", "/v1/models/r4-qv", token=None)
    assert status == 401, obj


# ---- logit_bias -------------------------------------------------------------


def greedy(body, chat=False):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    full = dict({"model": base(), "temperature": 0, "max_tokens": 4}, **body)
    if chat:
        full.setdefault("messages", [{"role": "user", "content": "Name a color."}])
    else:
        full.setdefault("prompt", "The capital of France is")
    status, obj = call("POST", path, full)
    assert status == 200, (full, obj)
    return obj


@A.test
def logit_bias_bans_and_forces_tokens():
    for chat in (False, True):
        lp_args = {"logprobs": True, "top_logprobs": 2} if chat else {"logprobs": 2}

        def first_of(obj):
            """(token, logprob, {alternative: logprob}) at the first position."""
            lp = obj["choices"][0]["logprobs"]
            if chat:
                e = lp["content"][0]
                return e["token"], e["logprob"], {t["token"]: t["logprob"]
                                                  for t in e["top_logprobs"]}
            return lp["tokens"][0], lp["token_logprobs"][0], lp["top_logprobs"][0]

        first, first_lp, _ = first_of(greedy(lp_args, chat))
        first_id = tokenize({"prompt": first, "add_special_tokens": False})["tokens"]
        assert len(first_id) == 1, (first, first_id)
        banned = greedy(dict(lp_args, logit_bias={str(first_id[0]): -100}), chat)
        first2, _, top2 = first_of(banned)
        assert first2 != first, (chat, first, first2)
        # the logprobs stay those of the raw logits: the banned token is
        # still the most likely, with the logprob it had
        assert abs(top2[first] - first_lp) < 1e-4, (chat, first, first_lp, top2)
        # +100 on one token: every token is it
        forced_id = tokenize({"prompt": " blue", "add_special_tokens": False})["tokens"]
        assert len(forced_id) == 1, forced_id
        forced = greedy({"logit_bias": {str(forced_id[0]): 100}, "temperature": 1.0,
                         "seed": 7}, chat)
        text = (forced["choices"][0]["message"]["content"] if chat
                else forced["choices"][0]["text"])
        assert text == " blue" * 4, (chat, text)
        assert forced["usage"]["completion_tokens"] == 4, forced
    # several entries, with a zero and the ends of the range, and streaming
    status, obj = call("POST", "/v1/completions",
                       {"model": base(), "prompt": "x", "max_tokens": 2, "stream": True,
                        "logit_bias": {"5": 0, "6": -100, "7": 100.0, "8": 1.5}})
    assert status == 200, obj


@A.test
def logit_bias_refusals():
    m = base()
    for chat in (False, True):
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"model": m, "max_tokens": 1}
        if chat:
            body["messages"] = [{"role": "user", "content": "x"}]
        else:
            body["prompt"] = "x"
        cases = [
            ([1, 2], "must be an object"),
            ("5", "must be an object"),
            ({"abc": 1}, "key 'abc' is not a token id"),
            ({"-1": 1}, "key '-1' is not a token id"),
            ({"1.5": 1}, "is not a token id"),
            ({"": 1}, "is not a token id"),
            ({"49152": 1}, "token id 49152 is outside the vocabulary (0 to 49151)"),
            ({"5": 100.5}, "of token 5 must be in [-100, 100], got 100.5"),
            ({"5": -101}, "must be in [-100, 100]"),
            ({"5": "1"}, "of token 5 must be a number"),
            ({"5": None}, "of token 5 must be a number"),
            ({"5": 1, "005": 2}, "names token 5 twice"),
            ({str(i): 1 for i in range(301)}, "has 301 entries, at most 300"),
        ]
        for bias, words in cases:
            msg = expect_error("POST", path, dict(body, logit_bias=bias), 400, "logit_bias")
            assert words in msg, (bias, msg)
        # 300 entries and null are fine
        status, obj = call("POST", path, dict(body, logit_bias={str(i): 1 for i in range(300)}))
        assert status == 200, obj
        status, obj = call("POST", path, dict(body, logit_bias=None))
        assert status == 200, obj


# ---- HEAD -------------------------------------------------------------------


def head_and_get(conn, path, token):
    """HEAD then GET of path on one kept-alive connection: (HEAD response,
    its headers, GET response, its body)."""
    h = {"Authorization": "Bearer " + token} if token else {}
    conn.request("HEAD", path, headers=h)
    r = conn.getresponse()
    hb = r.read()
    hh = {k.lower(): v for k, v in r.getheaders()}
    hs = r.status
    conn.request("GET", path, headers=h)
    g = conn.getresponse()
    gb = g.read()
    return hs, hh, hb, g.status, gb


@A.test
def head_answers_every_get_route_without_a_body():
    a = smol()
    admin_routes = ["/health", "/ready", "/metrics", "/v1/models", "/v1/models/r4-qv",
                    "/v1/loras", "/v1/loras/r4-qv", "/v1/loras/team%2Fsql:v2"]
    public_routes = ["/health", "/ready", "/metrics", "/v1/models", "/v1/models/r4-qv",
                     "/v1/models/team/sql:v2"]
    for admin, routes in ((False, public_routes), (True, admin_routes)):
        conn = a.conn(admin)
        try:
            for path in routes:
                hs, hh, hb, gs, gb = head_and_get(conn, path, None if admin else KEY)
                assert hs == 200 and gs == 200, (admin, path, hs, gs, gb[:200])
                assert hb == b"", (admin, path, hb[:100])
                if path != "/metrics":  # its numbers move between the two
                    assert int(hh["content-length"]) == len(gb), (admin, path, hh)
                else:
                    assert int(hh["content-length"]) > 0, hh
        finally:
            conn.close()
    # curl -I, as an operator would probe it (gate fast path and civetweb)
    for path, token in (("/health", None), ("/ready", None), ("/v1/models", KEY),
                        ("/v1/models/team/sql:v2", KEY), ("/metrics", None)):
        args = ["curl", "-sS", "-I", "--max-time", "30", a.url(path)]
        if token:
            args += ["-H", "Authorization: Bearer " + token]
        p = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (path, p.stderr)
        lines = p.stdout.splitlines()
        assert lines[0].startswith("HTTP/1.1 200"), (path, p.stdout)
        assert any(l.lower().startswith("content-length:") for l in lines), p.stdout
    # HEAD is refused where GET is, and not offered on POST routes
    status, hdrs, data = a.request("HEAD", "/v1/models")
    assert status == 401 and data == b"", (status, data)
    status, hdrs, data = a.request("HEAD", "/v1/models/no-such", token=KEY)
    assert status == 404 and data == b"", (status, data)
    status, hdrs, data = a.request("HEAD", "/v1/completions", token=KEY)
    assert status == 405 and hdrs["allow"] == "POST" and data == b"", (status, hdrs)
    status, hdrs, data = a.request("HEAD", "/tokenize", token=KEY)
    assert status == 405 and hdrs["allow"] == "POST", (status, hdrs)


# ---- logprobs bytes of partial characters -----------------------------------


def emoji_lead_token():
    """The token holding the first bytes of an emoji (SmolLM2 splits 😀
    into F0 9F | 98 | 80)."""
    ids = tokenize({"prompt": "😀", "add_special_tokens": False, "return_token_strs": True})
    assert ids["count"] >= 2, ids
    return ids["tokens"][0]


def check_bytes(entries, text):
    joined = bytes(b for e in entries for b in e["bytes"])
    assert joined == text.encode("utf-8"), (joined, text, [e["token"] for e in entries])
    partial = 0
    for e in entries:
        raw = bytes(e["bytes"])
        try:
            assert e["token"] == raw.decode("utf-8"), e
        except UnicodeDecodeError:
            partial += 1
            # the string escapes the bytes that are not a whole character
            assert "\\x" in e["token"], e
            assert bytes(b for b in raw if b < 0x80) in e["token"].encode(), e
        for t in e.get("top_logprobs", []):
            if t["token"] == e["token"]:
                assert t["bytes"] == e["bytes"], (t, e)
    return partial


@A.test
def chat_logprob_bytes_of_partial_characters_join_into_the_text():
    lead = emoji_lead_token()
    body = {"model": base(), "messages": [{"role": "user", "content": "Reply with emoji."}],
            "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 3,
            "logit_bias": {str(lead): 5}}
    status, obj = call("POST", "/v1/chat/completions", body)
    assert status == 200, obj
    choice = obj["choices"][0]
    text = choice["message"]["content"]
    assert any(ord(ch) > 0xffff for ch in text), text  # an emoji, not U+FFFD
    assert "\ufffd" not in text, text
    assert check_bytes(choice["logprobs"]["content"], text) >= 2, choice["logprobs"]
    # streamed: the chunks' entries join into the streamed text the same way
    status, hdrs, data = smol().request("POST", "/v1/chat/completions", dict(body, stream=True),
                                        token=KEY)
    assert status == 200, data[:300]
    events, done = A.sse_events(data)
    assert done
    entries, streamed = [], ""
    for ev in events:
        for ch in ev.get("choices", []):
            streamed += ch["delta"].get("content") or ""
            if ch.get("logprobs"):
                entries += ch["logprobs"]["content"]
    assert streamed == text, (streamed, text)
    check_bytes(entries, streamed)


def cleanup():
    failed = 0
    if _smol is not None:
        failed += A.stop_agent(_smol, "test-api-extras:shutdown")
    shutil.rmtree(TMP, ignore_errors=True)
    return failed


if __name__ == "__main__":
    A.main("test-api-extras", cleanup)
