#!/usr/bin/env python3
"""loraplane-generate as a user runs it: real processes, real model files.

Checks the completion text against the reference greedy tokens, seeds,
batches from --prompts-file, chat mode, bad usage, and that corrupted or
truncated model files (made here, in a temporary directory) each give a
clear error and exit status 1 without a crash or sanitizer report.
Prints one PASS/FAIL line per test (counted by tests/run.sh)."""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

from harness import run_tests, test

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.chdir(ROOT)
BIN = os.path.join(os.environ.get("BIN", "bin"), "loraplane-generate")
MODEL = os.environ.get("MODEL", "models/smollm2-135m-instruct-q4_1.gguf")
FIX = os.environ.get("LP_FIXTURES", "tests/fixtures")
TINY = os.path.join(FIX, "tiny-llama")
TIMEOUT = 600


def run(*args, stdin=None):
    p = subprocess.run([BIN, *args], capture_output=True, timeout=TIMEOUT, input=stdin)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def sp_decode(ids, tokenizer_json):
    """Decodes ids of the SentencePiece-style tiny tokenizer the way its
    decoder pipeline does (Replace ▁, ByteFallback, Fuse, Strip 1 left),
    skipping special tokens."""
    tok = json.load(open(tokenizer_json, encoding="utf-8"))
    inv = {v: k for k, v in tok["model"]["vocab"].items()}
    special = {t["id"] for t in tok["added_tokens"] if t.get("special")}
    pieces, run = [], bytearray()

    def flush():
        # ByteFallback: a run of byte tokens that is not valid UTF-8 becomes
        # one U+FFFD per byte
        if run:
            try:
                pieces.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                pieces.append("\ufffd" * len(run))
            run.clear()

    for i in ids:
        if i in special:
            continue
        piece = inv[i]
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            run.append(int(piece[3:5], 16))
        else:
            flush()
            pieces.append(piece.replace("\u2581", " "))
    flush()
    text = "".join(pieces)
    return text[1:] if text.startswith(" ") else text


def generate_ids(*args, prompt, adapter=None):
    """Runs one prompt through --prompts-file and returns (ids, text)."""
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "p.txt")
        with open(f, "w", encoding="utf-8") as fh:
            fh.write((f"{adapter}\t" if adapter else "") + prompt + "\n")
        rc, out, err = run(*args, "--prompts-file", f)
        assert rc == 0, err
        row = json.loads(out)
        return row["completion_ids"], row["completion"]


def same_text(got, want):
    """Text equality, except where the reference holds U+FFFD: there the
    streamed decoder may keep valid bytes of a run that HF's whole-sequence
    ByteFallback decode turns into U+FFFD (token equality is checked by
    ids)."""
    return got == want or "\ufffd" in want


def clean_stderr(err):
    assert "AddressSanitizer" not in err and "runtime error" not in err, "sanitizer report:\n" + err


@test
def greedy_text_matches_reference():
    gold = json.load(open(os.path.join(FIX, "goldens", "tiny-llama.json")))
    for p in gold["prompts"]:
        if not p["text"]:
            continue
        rc, out, err = run("--model", TINY, "--prompt", p["text"], "--max-tokens", "32",
                           "--ignore-eos")
        assert rc == 0, f"exit {rc}: {err}"
        clean_stderr(err)
        want = sp_decode(p["greedy"], os.path.join(TINY, "tokenizer.json"))
        assert same_text(out[:-1], want), f"prompt {p['text']!r}: got {out!r}, want {want!r}"
        assert "tokens/s" in err, "no speed figures on stderr: " + err
        ids, text = generate_ids("--model", TINY, "--max-tokens", "32", "--ignore-eos",
                                 prompt=p["text"])
        assert ids == p["greedy"], f"prompt {p['text']!r}: ids {ids} vs {p['greedy']}"
        assert text + "\n" == out, "streamed and batch text differ"


@test
def statistics_start_on_their_own_line_in_a_merged_log():
    # stdout and stderr into one pipe (a log collector): the completion's
    # line ends before the statistics begin
    p = subprocess.run([BIN, "--model", TINY, "--prompt", "hi", "--max-tokens", "4", "--threads",
                        "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout
    lines = p.stdout.decode("utf-8", "replace").split("\n")
    assert any(line.startswith("prompt: ") for line in lines), lines
    assert any(line.startswith("generation: ") for line in lines), lines


@test
def seed_reproducible():
    args = ["--model", TINY, "--prompt", "Once upon a time", "--max-tokens", "24",
            "--temperature", "1.0", "--top-p", "0.95", "--ignore-eos"]
    a = run(*args, "--seed", "7")
    b = run(*args, "--seed", "7")
    c = run(*args, "--seed", "8")
    assert a[0] == 0 and b[0] == 0 and c[0] == 0, a[2] + c[2]
    assert a[1] == b[1], f"same seed, different output: {a[1]!r} vs {b[1]!r}"
    assert a[1] != c[1], "different seeds gave the same 24 sampled tokens"


@test
def prompts_file_batch_equals_single():
    prompts = ["Hello", "The quick brown fox", "In 1969, 3 people flew to the moon & back!",
               "water", "Once upon a time there was a little girl", "Café résumé",
               "What would you write?", "a b c d e f g"]
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "prompts.txt")
        with open(f, "w", encoding="utf-8") as fh:
            fh.write("\n".join(prompts) + "\n\n")
        rc, out, err = run("--model", TINY, "--prompts-file", f, "--max-tokens", "20",
                           "--ignore-eos")
        assert rc == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert len(rows) == len(prompts), out
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            assert row["index"] == i and row["prompt"] == prompt, row
            assert row["completion_tokens"] == 20 and row["finish_reason"] == "length", row
            rc, single, err = run("--model", TINY, "--prompt", prompt, "--max-tokens", "20",
                                  "--ignore-eos")
            assert rc == 0, err
            assert single == row["completion"] + "\n", f"{prompt!r}: {single!r} vs {row['completion']!r}"


@test
def stop_string_cuts_output():
    rc, full, err = run("--model", TINY, "--prompt", "Hello", "--max-tokens", "32", "--ignore-eos")
    assert rc == 0, err
    text = full[:-1]
    # cut at a substring in the middle of the completion
    cut = text[5:8]
    assert cut, text
    rc, out, err = run("--model", TINY, "--prompt", "Hello", "--max-tokens", "32", "--ignore-eos",
                       "--stop", cut)
    assert rc == 0, err
    assert out == text[: text.index(cut)] + "\n", f"{out!r} vs {text!r} cut at {cut!r}"


@test
def chat_smollm2_answers_and_stops():
    rc, out, err = run("--model", MODEL, "--chat", "--prompt", "What is the capital of France?",
                       "--max-tokens", "64")
    assert rc == 0, err
    assert "Paris" in out, f"unexpected answer {out!r}"
    assert "<|im_end|>" not in out and "<|im_start|>" not in out, out


@test
def lora_adapter_matches_peft():
    gold = json.load(open(os.path.join(FIX, "goldens", "lora-tiny-r8-all.json")))
    checked = 0
    for p in gold["prompts"]:
        if not p["text"]:
            continue
        rc, out, err = run("--model", TINY, "--lora", "sql=" + gold["adapter"], "--adapter", "sql",
                           "--prompt", p["text"], "--max-tokens", "32", "--ignore-eos")
        assert rc == 0, err
        assert "loaded adapter 'sql'" in err, err
        want = sp_decode(p["greedy"], os.path.join(TINY, "tokenizer.json"))
        assert same_text(out[:-1], want), f"{p['text']!r}: got {out!r}, want {want!r}"
        ids, _ = generate_ids("--model", TINY, "--lora", "sql=" + gold["adapter"], "--max-tokens",
                              "32", "--ignore-eos", prompt=p["text"], adapter="sql")
        assert ids == p["greedy"], f"{p['text']!r}: ids {ids} vs peft {p['greedy']}"
        assert p["greedy"] != p["base_greedy"]
        checked += 1
    assert checked >= 2


@test
def prompts_file_mixed_adapters():
    mixed = json.load(open(os.path.join(FIX, "goldens", "lora-tiny-mixed.json")))
    reqs = [r for r in mixed["requests"] if r.get("text") and "\t" not in r["text"]
            and "\n" not in r["text"]]
    names = sorted({r["adapter"] for r in reqs if r["adapter"]})
    with tempfile.TemporaryDirectory() as d:
        f = os.path.join(d, "prompts.tsv")
        with open(f, "w", encoding="utf-8") as fh:
            for r in reqs:
                fh.write(f"{r['adapter'] or '-'}\t{r['text']}\n")
        args = ["--model", TINY, "--prompts-file", f, "--max-tokens", "32", "--ignore-eos",
                "--max-loras", "3"]
        for n in names:
            args += ["--lora", f"{n}=" + os.path.join(FIX, "lora", "tiny", n)]
        rc, out, err = run(*args)
        assert rc == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert len(rows) == len(reqs) >= 12, (len(rows), len(reqs))
        for row, r in zip(rows, reqs):
            assert row["adapter"] == r["adapter"], row
            assert row["completion_ids"] == r["greedy"], f"{r['adapter']} {r['text']!r}: {row['completion_ids']} vs {r['greedy']}"


@test
def lora_errors_exit_1():
    rc, out, err = run("--model", TINY, "--lora", "x=/nonexistent/adapter", "--prompt", "hi")
    assert rc == 1 and "/nonexistent/adapter" in err, err
    rc, out, err = run("--model", TINY, "--adapter", "nope", "--prompt", "hi")
    assert rc == 1 and "nope" in err, err
    rc, out, err = run("--model", TINY, "--lora", "big=" + os.path.join(FIX, "lora", "tiny", "r64-mlp"),
                       "--max-lora-rank", "16", "--prompt", "hi")
    assert rc == 1 and "16" in err and "rank" in err, err


@test
def bad_usage_exit_2():
    for args in (["--model", TINY], ["--prompt", "x"], ["--model", TINY, "--prompt", "x",
                 "--max-tokens", "abc"], ["--model", TINY, "--prompt", "x", "--bogus"]):
        env = dict(os.environ)
        env.pop("LORAPLANE_MODEL", None)
        p = subprocess.run([BIN, *args], capture_output=True, timeout=60, env=env)
        assert p.returncode == 2, f"{args}: exit {p.returncode}"
        assert p.stderr, f"{args}: no message"


@test
def bad_sampling_values_exit_1():
    for args in (["--temperature", "-1"], ["--top-p", "1.5"], ["--min-p", "2"]):
        rc, out, err = run("--model", TINY, "--prompt", "x", *args)
        assert rc == 1, f"{args}: exit {rc}"
        assert args[0][2:].replace("-", "_") in err or args[0][2:] in err, f"{args}: {err!r}"


def corrupt_cases(d):
    """Yields (name, path) of broken models made from the real ones."""
    data = open(MODEL, "rb").read()

    def write(name, blob):
        p = os.path.join(d, name)
        with open(p, "wb") as f:
            f.write(blob)
        return p

    yield "gguf truncated in the middle", write("half.gguf", data[: len(data) // 2])
    yield "gguf truncated in the header", write("head.gguf", data[:100])
    yield "gguf truncated by one byte", write("short.gguf", data[:-1])
    yield "gguf bad magic", write("magic.gguf", b"GGUX" + data[4:4096])
    yield "gguf unknown version", write("version.gguf", data[:4] + struct.pack("<I", 99) + data[8:4096])
    yield "gguf huge tensor count", write("count.gguf", data[:8] + struct.pack("<Q", 1 << 60) + data[16:4096])
    yield "empty file", write("empty.gguf", b"")
    yield "missing file", os.path.join(d, "nope.gguf")

    def tiny_copy(name):
        p = os.path.join(d, name)
        shutil.copytree(TINY, p)
        return p

    p = tiny_copy("badjson")
    with open(os.path.join(p, "config.json"), "w") as f:
        f.write('{"model_type": "llama", "hidden_size": ')
    yield "config.json invalid", p

    p = tiny_copy("badshape")
    cfg = json.load(open(os.path.join(p, "config.json")))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(os.path.join(p, "config.json"), "w"))
    yield "config.json disagrees with the weights", p

    p = tiny_copy("truncshard")
    shard = os.path.join(p, "model-00002-of-00002.safetensors")
    blob = open(shard, "rb").read()
    open(shard, "wb").write(blob[: len(blob) - 1000])
    yield "safetensors shard truncated", p

    p = tiny_copy("hugeheader")
    shard = os.path.join(p, "model-00001-of-00002.safetensors")
    blob = open(shard, "rb").read()
    open(shard, "wb").write(struct.pack("<Q", 1 << 62) + blob[8:])
    yield "safetensors header length huge", p

    p = tiny_copy("missingshard")
    os.remove(os.path.join(p, "model-00002-of-00002.safetensors"))
    yield "safetensors shard missing", p

    p = tiny_copy("notok")
    os.remove(os.path.join(p, "tokenizer.json"))
    yield "tokenizer.json missing", p


@test
def corrupted_models_fail_cleanly():
    with tempfile.TemporaryDirectory() as d:
        n = 0
        for name, path in corrupt_cases(d):
            rc, out, err = run("--model", path, "--prompt", "hi", "--max-tokens", "2")
            assert rc == 1, f"{name}: exit status {rc}, stderr {err!r}"
            clean_stderr(err)
            assert err.startswith("loraplane-generate: ") and len(err.strip()) > 30, f"{name}: {err!r}"
            assert os.path.basename(path) in err, f"{name}: error does not name the file: {err!r}"
            assert out == "", f"{name}: printed {out!r}"
            n += 1
        assert n >= 8


if __name__ == "__main__":
    sys.exit(1 if run_tests("test-generate") else 0)
