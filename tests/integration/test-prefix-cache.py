#!/usr/bin/env python3
"""Automatic prefix caching through the HTTP API (docs/api.md,
usage.prompt_tokens_details; docs/architecture.md, "Prefix caching").

Two agents on the tiny model with the same two adapters: one with prefix
caching (the default), one with --no-enable-prefix-caching. Through the
official openai client: a chat request with a long system prompt, asked
again, reports its full prompt blocks as cached tokens and gives the same
greedy text, equal to the uncached agent's; the same prompt on the other
adapter and on the base model finds nothing; after POST /v1/loras with
load_inplace the new version finds nothing of the old one; the
vllm:prefix_cache_* counters agree with the usage figures; and the agent
without caching never reports a cached token. Prints one PASS/FAIL line per
test."""

import os

import harness as H  # noqa: E402

BLOCK = 16
SYSTEM = ("You answer questions about rivers, hills and old stone bridges. " * 3).strip()
_on = _off = None


def agents():
    global _on, _off
    if _on is None:
        mods = ["--lora-modules", "ta=" + os.path.join(H.TINY_LORAS, "r8-all"),
                "--lora-modules", "tb=" + os.path.join(H.TINY_LORAS, "r16-attn"),
                "--allowed-local-roots", os.path.abspath(H.TINY_LORAS), *H.TINY_ARGS]
        _on = H.Agent(*mods)
        _off = H.Agent(*mods, "--no-enable-prefix-caching")
    return _on, _off


def chat(agent, model, user, max_tokens=12):
    r = agent.client().chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
    u = r.usage
    cached = u.prompt_tokens_details.cached_tokens if u.prompt_tokens_details else None
    return r.choices[0].message.content, u.prompt_tokens, cached


def prefix_counters(agent):
    """(queries, hits) from the public port's vllm:prefix_cache_* counters."""
    status, _, data = agent.request("GET", "/metrics")
    assert status == 200, status
    got = {}
    for line in data.decode().splitlines():
        for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"):
            if line.startswith(name + "{") or line.startswith(name + " "):
                got[name] = got.get(name, 0) + float(line.rsplit(" ", 1)[1])
    return got.get("vllm:prefix_cache_queries_total"), got.get("vllm:prefix_cache_hits_total")


@H.test
def repeat_finds_its_blocks():
    on, off = agents()
    text1, n_prompt, cached1 = chat(on, "ta", "Which bridge is oldest?")
    assert n_prompt > 3 * BLOCK, f"the prompt is only {n_prompt} tokens"
    q0, h0 = prefix_counters(on)
    text2, n2, cached2 = chat(on, "ta", "Which bridge is oldest?")
    q1, h1 = prefix_counters(on)
    assert n2 == n_prompt and text2 == text1, (text1, text2)
    want = (n_prompt - 1) // BLOCK * BLOCK
    assert cached2 == want, f"cached {cached2}, expected {want} of {n_prompt}"
    assert q1 - q0 == n_prompt and h1 - h0 == cached2, (q0, q1, h0, h1)
    # the uncached agent computes everything and says the same
    text_off, _, cached_off = chat(off, "ta", "Which bridge is oldest?")
    assert cached_off == 0 and text_off == text1, (text_off, text1)
    # another question after the same system prompt shares its blocks
    _, n3, cached3 = chat(on, "ta", "And the longest river?")
    assert 0 < cached3 < n3 and cached3 % BLOCK == 0, (cached3, n3)


@H.test
def adapters_share_nothing():
    on, _ = agents()
    chat(on, "ta", "Where do the hills end?")
    _, _, cached = chat(on, "tb", "Where do the hills end?")
    assert cached == 0, f"adapter tb found {cached} tokens of adapter ta"
    _, _, cached = chat(on, on.base_name(), "Where do the hills end?")
    assert cached == 0, f"the base model found {cached} tokens of an adapter"
    _, _, cached = chat(on, "tb", "Where do the hills end?")
    assert cached > 0, "tb did not find its own blocks"


@H.test
def inplace_reload_forgets_old_blocks():
    on, off = agents()
    chat(on, "ta", "Name a stone bridge.")
    _, _, cached = chat(on, "ta", "Name a stone bridge.")
    assert cached > 0
    status, obj = on.json("POST", "/v1/loras", {
        "lora_name": "ta", "source": {"uri": "file://" + os.path.abspath(os.path.join(H.TINY_LORAS, "r4-qv"))},
        "load_inplace": True}, admin=True)
    assert status in (200, 201), (status, obj)
    text, _, cached = chat(on, "ta", "Name a stone bridge.")
    assert cached == 0, f"the reloaded adapter found {cached} tokens of the old version"
    # and it gives the new weights' text: the same as an agent that loads
    # r4-qv as ta from the start (the uncached agent, reloaded the same way)
    status, obj = off.json("POST", "/v1/loras", {
        "lora_name": "ta", "source": {"uri": "file://" + os.path.abspath(os.path.join(H.TINY_LORAS, "r4-qv"))},
        "load_inplace": True}, admin=True)
    assert status in (200, 201), (status, obj)
    text_off, _, _ = chat(off, "ta", "Name a stone bridge.")
    assert text == text_off, (text, text_off)


@H.test
def caching_off_finds_nothing():
    _, off = agents()
    for _ in range(2):
        _, _, cached = chat(off, "tb", "Which hill is highest?")
        assert cached == 0
    q, h = prefix_counters(off)
    assert not h, f"the uncached agent counts {h} hits"


def cleanup():
    return H.stop_agent(_on, "test-prefix-cache.py:on") + \
        H.stop_agent(_off, "test-prefix-cache.py:off")


if __name__ == "__main__":
    H.main("test-prefix-cache.py", cleanup)
