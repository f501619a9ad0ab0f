#!/usr/bin/env python3
"""A PEFT LoRA adapter for the real Gemma 3 270M (Q4_K_M GGUF,
models/gemma-3-270m-q4_k_m.gguf from make deps) and the completions the
agent must serve with it and without it.

  tests/fixtures/lora/gemma3-270m/r4-qvd/  the adapter as peft's
                                           save_pretrained writes it (rank 4,
                                           q_proj, v_proj and down_proj of 6
                                           of the 18 layers, float32)
  tests/fixtures/goldens/gemma3-270m-lora.json
                                           per prompt: the ids, 32 greedy
                                           tokens with the adapter and
                                           without it, and their text

The base model is what make-gemma3-real-goldens.py runs: transformers reading
the GGUF file (every tensor dequantised by the gguf package) in float32 on
the CPU. PEFT wraps that model: LoraConfig + get_peft_model, lora_A and
lora_B overwritten by seeded random values and calibrated as
make-lora-goldens.py does (B is not zero, so the adapter changes the
tokens), save_pretrained, then PeftModel.from_pretrained over the saved
directory gives the goldens, so they are what the files on disk do. Prompts
are plain text sent to /v1/completions: the agent encodes them as
transformers' tokenizer does (BOS added; the file has no chat template). A
prompt is kept when every greedy step is well separated (top-2 gap above
1e-3 of the logit range) with and without the adapter and neither greedy
path holds an end-of-sequence token (the agent would stop there); a seed is
kept when the adapter changes a token within the first 16 on all but at
most one prompt.

The layers include global ones (5, 11, 17) and local ones; the adapter stays
under 1 MB (rank 4 on all 18 layers would be 1.5 MB).

Needs the reference venv with peft (hack/README.md) and the model (make
deps). Deterministic: rerunning gives byte-identical files. About 3 minutes
on one core.

usage: hack/make-gemma3-real-lora.py [path/to/gemma-3-270m-q4_k_m.gguf]
"""

import glob
import hashlib
import json
import os
import sys

sys.dont_write_bytecode = True

HACK = os.path.dirname(os.path.abspath(__file__))


from sibling import load_script  # noqa: E402


# make-lora-goldens.py makes, calibrates and saves adapters (it loads
# make-goldens.py: the offline / single-thread environment and the greedy
# loop); make-gemma3-real-goldens.py has the model path and the prompts.
mlg = load_script("make_lora_goldens", "make-lora-goldens.py")
mgr = load_script("make_gemma3_real_goldens", "make-gemma3-real-goldens.py")
mg = mlg.mg

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

KEY = "gemma3-270m"
# normalised as the agent compares base model names (docs/lora-formats.md),
# this is the served file's stem without its quantisation suffix
BASE_NAME = "google/gemma-3-270m"
LAYERS = [2, 5, 8, 11, 14, 17]  # 5, 11 and 17 are global (every 6th)
SPEC = ("r4-qvd", 4, 8, [mlg.Q, mlg.V, mlg.DOWN], {"layers_to_transform": LAYERS})
OUT_DIR = os.path.join(mlg.LORA_DIR, KEY, SPEC[0])
OUT = os.path.join(mg.GOLDENS, KEY + "-lora.json")
N_PROMPTS = 4
FIRST_SEED = 12000
EOS_IDS = (1, 106)  # <eos> and <end_of_turn>: the agent stops at both
MAX_ADAPTER_BYTES = 1000 * 1000
# plain text: the real file is the pretrained model and has no chat template
CANDIDATES = [p for p in mgr.PROMPTS if "<start_of_turn>" not in p] + [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "My favourite season of the year is",
    "Please write a short poem about the sea.",
    "The three primary colours are",
]


def main(argv):
    path = argv[1] if len(argv) > 1 else mgr.MODEL
    if not os.path.isfile(path):
        raise SystemExit("%s missing; run make deps" % path)
    mg.setup_torch()
    d, f = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    with open(path, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()

    def encode(text):
        return tok(text)["input_ids"]

    # base greedy paths that reach an end-of-sequence token cannot be
    # compared over a whole max_tokens: leave those prompts out up front
    base = mlg.Base(KEY, model, encode, mg.rel(path),
                    "transformers' tokenizer from the file's tokenizer.ggml.* (BOS added)",
                    "GGUF weights dequantised to float32 by transformers, computed in float32; "
                    "adapter float32", BASE_NAME, [], N_PROMPTS)
    for text in CANDIDATES:
        if not any(t in EOS_IDS for t in base.greedy(encode(text))[1]):
            base.candidates.append(text)

    for seed in range(FIRST_SEED, FIRST_SEED + mlg.SEED_TRIES):
        got = mlg.try_adapter(base, SPEC, seed, OUT_DIR)
        if got is None:
            continue
        entries, _, peft_model = got
        if not any(t in EOS_IDS for e in entries for t in e["greedy"]):
            break
        print("seed %d: an adapter greedy path reaches end-of-sequence; next seed" % seed)
    else:
        raise SystemExit("%s/%s: no seed gave %d well-separated prompts the adapter changes"
                         % (KEY, SPEC[0], N_PROMPTS))

    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(OUT_DIR, "*")))
    if size >= MAX_ADAPTER_BYTES:
        raise SystemExit("%s: %d bytes, over 1 MB" % (mg.rel(OUT_DIR), size))
    modules, layers = mlg.module_summary(peft_model)
    with open(os.path.join(OUT_DIR, "adapter_config.json"), encoding="utf-8") as fh:
        acfg = json.load(fh)
    prompts = []
    for e in entries:
        prompts.append({
            "text": e["text"],
            "ids": e["ids"],
            "greedy": e["greedy"],
            "greedy_text": tok.decode(e["greedy"], skip_special_tokens=True),
            "greedy_tokens": tok.convert_ids_to_tokens(e["greedy"]),
            "base_greedy": e["base_greedy"],
            "base_greedy_text": tok.decode(e["base_greedy"], skip_special_tokens=True),
            "base_greedy_tokens": tok.convert_ids_to_tokens(e["base_greedy"]),
            "first_change": e["first_change"],
            "min_top2_gap_rel": e["min_top2_gap_rel"],
            "base_min_top2_gap_rel": e["base_min_top2_gap_rel"],
        })
    changed = sum(p["first_change"] is not None and p["first_change"] < mlg.CHANGED_WITHIN for p in prompts)
    doc = {
        "model": mg.rel(path),
        "sha256": sha,
        "adapter": mg.rel(OUT_DIR),
        "reference": mlg.REFERENCE,
        "tokenizer": base.tokenizer,
        "dtype": base.dtype,
        "vocab_size": base.vocab_size,
        "eos_token_ids": list(EOS_IDS),
        "max_tokens": mg.NEW_TOKENS,
        "lora": {
            "r": acfg["r"],
            "lora_alpha": acfg["lora_alpha"],
            "target_modules": acfg["target_modules"],
            "layers_to_transform": acfg["layers_to_transform"],
            "base_model_name_or_path": acfg["base_model_name_or_path"],
            "layers": layers,
            "modules": modules,
            "seed": seed,
            "calibrated_output_delta_ratio": mlg.DELTA_RATIO,
        },
        "note": "greedy / base_greedy: %d argmax tokens with the adapter / without it, each prompt alone, "
        "never stopped by EOS (none occurs); *_text: transformers' decode with skip_special_tokens; "
        "*_tokens: convert_ids_to_tokens" % mg.NEW_TOKENS,
        "changed_prompts": "%d of %d prompts: greedy tokens differ from base_greedy within the first %d"
        % (changed, len(prompts), mlg.CHANGED_WITHIN),
        "prompts": prompts,
    }
    mg.write_json(OUT, doc)
    print("%s: seed %d, %d bytes; %s: %s, %d bytes"
          % (mg.rel(OUT_DIR), seed, size, mg.rel(OUT), doc["changed_prompts"], os.path.getsize(OUT)))
    for p in prompts:
        print("  %r\n    base:    %r\n    adapter: %r" % (p["text"][:40], p["base_greedy_text"], p["greedy_text"]))


if __name__ == "__main__":
    main(sys.argv)
