#!/usr/bin/env python3
"""The real Gemma 3 270M (models/gemma-3-270m-q4_k_m.gguf, from make deps)
served by loraplane-agent with a PEFT adapter loaded at run time
(tests/fixtures/lora/gemma3-270m/r4-qvd, POST /v1/loras): greedy
completions through the openai client, the base model's and the adapter's
sent at once so that they share batches, must give the tokens and the text
transformers + peft give (tests/fixtures/goldens/gemma3-270m-lora.json,
hack/make-gemma3-real-lora.py). The file has no chat template, so chat is
400 no_chat_template.

Without the model file the test prints why and passes, except in CI
(CI=true), where a missing model is a failure. Prints one PASS/FAIL line
per test."""

import concurrent.futures
import json
import os
import re
import sys

import harness as A  # noqa: E402

MODEL = os.environ.get("GEMMA3_MODEL", "models/gemma-3-270m-q4_k_m.gguf")
ADAPTERS = os.path.abspath(os.path.join(A.FIX, "lora", "gemma3-270m"))
GOLDENS = os.path.join(A.FIX, "goldens", "gemma3-270m-lora.json")
ADAPTER = "r4-qvd"
ARGS = ["--threads", "2", "--max-model-len", "256", "--kv-cache-bytes", str(32 << 20),
        "--allowed-local-roots", ADAPTERS]
_agent = None
_golden = None


def agent():
    global _agent
    if _agent is None:
        _agent = A.Agent(*ARGS, model=MODEL, timeout=120)
    return _agent


def golden():
    global _golden
    if _golden is None:
        with open(GOLDENS, encoding="utf-8") as fh:
            _golden = json.load(fh)
    return _golden


def logprob_token(piece):
    """The token string the agent's logprobs give for a SentencePiece
    vocabulary entry (docs/api.md, 3.2): its own bytes ('▁' is a space,
    '<0xNN>' one byte), whole UTF-8 characters as text and any other byte
    as the four characters \\xNN."""
    m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    raw = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode()
    return raw.decode("utf-8", errors="backslashreplace")


@A.test
def adapter_loads_at_run_time():
    a = agent()
    src = os.path.join(ADAPTERS, ADAPTER)
    status, obj = a.json("POST", "/v1/loras", {"lora_name": ADAPTER, "source": {"uri": "file://" + src}},
                         admin=True)
    assert status == 201, (status, obj)
    want = golden()["lora"]
    assert obj["rank"] == want["r"] and obj["format"] == "peft", obj
    assert sorted(obj["modules"]) == sorted(want["target_modules"]), obj
    ids = [m.id for m in a.client().models.list().data]
    assert ids == [a.base_name(), ADAPTER], ids


@A.test
def prompts_tokenize_as_transformers():
    a = agent()
    for p in golden()["prompts"]:
        status, obj = a.json("POST", "/tokenize", {"model": ADAPTER, "prompt": p["text"]})
        assert status == 200 and obj["tokens"] == p["ids"], (p["text"], status, obj)


@A.test
def base_and_adapter_in_one_batch_match_transformers_and_peft():
    a = agent()
    g = golden()
    client = a.client()
    jobs = []
    for p in g["prompts"]:
        jobs.append((a.base_name(), p, p["base_greedy"], p["base_greedy_text"], p["base_greedy_tokens"]))
        jobs.append((ADAPTER, p, p["greedy"], p["greedy_text"], p["greedy_tokens"]))

    def complete(job):
        model, p = job[0], job[1]
        return client.completions.create(model=model, prompt=p["text"], max_tokens=g["max_tokens"],
                                         temperature=0, logprobs=0)

    # all at once: the engine batches base and adapter sequences together
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(complete, jobs))
    wrong = []
    changed = 0
    for (model, p, ids, text, pieces), r in zip(jobs, results):
        c = r.choices[0]
        got = c.logprobs.tokens
        want = [logprob_token(t) for t in pieces]
        assert r.usage.prompt_tokens == len(p["ids"]), (model, p["text"], r.usage)
        assert r.usage.completion_tokens == len(ids) and c.finish_reason == "length", (model, r)
        if got != want or c.text != text:
            first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
            wrong.append("%s on %r: first differing token %d (got %r, want id %d %r); text %r, want %r"
                         % (model, p["text"][:30], first, got[first:first + 3], ids[first] if first < len(ids)
                            else -1, want[first:first + 3], c.text, text))
        changed += model == ADAPTER and p["greedy"] != p["base_greedy"]
    assert not wrong, "\n     also ".join(wrong)
    assert changed >= len(g["prompts"]) - 1, "the adapter changes too few prompts: %d" % changed


@A.test
def chat_without_template_is_400_no_chat_template():
    import openai
    client = agent().client()
    for model in (agent().base_name(), ADAPTER):
        try:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4)
        except openai.BadRequestError as e:
            assert e.status_code == 400 and e.code == "no_chat_template", (e.status_code, e.body)
        else:
            raise AssertionError("chat on %s answered although the model has no chat template" % model)
    A.assert_healthy(agent())


def main():
    program = os.path.basename(sys.argv[0])
    if not os.path.isfile(MODEL):
        if os.environ.get("CI") == "true":
            print("FAIL %s: %s is missing (make deps fetches it)" % (program, MODEL), flush=True)
            sys.exit(1)
        print("skipped %s: %s is missing (make deps fetches it; in CI this fails)" % (program, MODEL),
              flush=True)
        sys.exit(0)
    A.main(program, lambda: A.stop_agent(_agent, program + ":stop"))


if __name__ == "__main__":
    main()
