#!/usr/bin/env python3
"""Builds the tiny test model and the model reference outputs ("goldens").

  tests/fixtures/tiny-llama/           a tiny random Llama (GQA, llama3 RoPE
                                       scaling, untied embeddings) saved by
                                       transformers as bf16 safetensors in two
                                       shards, with the spbpe test tokenizer
  tests/fixtures/goldens/tiny-llama.json, tiny-llama-<i>.f32
  tests/fixtures/goldens/smollm2.json,    smollm2-<i>.f32
                                       prompt ids, 32 greedy tokens and the
                                       prompt's last-position logits computed
                                       by HF transformers in float32 on the CPU

Each goldens file holds:
  {"model", "reference", "tokenizer", "vocab_size", "eos_token_id",
   "prompts": [{"text", "ids", "greedy", "logits_file", "logit_min",
                "logit_max", "min_top2_gap", "min_top2_gap_rel"}],
   "batch": {"note", "prompts": [{"text", "ids", "greedy", "min_top2_gap",
                                  "min_top2_gap_rel"}]}}
The .f32 files are raw little-endian float32, vocab_size values each: the
logits at the last prompt position, i.e. the ones the first greedy token is
the argmax of. Greedy decoding is a plain argmax loop over a KV cache that
never stops at EOS; every prompt is run on its own (batch size 1), so the
"batch" prompts give the tokens a batched run must reproduce. min_top2_gap is
the smallest (top1 - top2) logit difference over the 32 greedy steps and
min_top2_gap_rel the same divided by that step's logit range; the script
refuses prompts (and tiny-model seeds) where the latter is under 1e-3, so a
mismatch in a C test is a real bug, not a near-tie.

Needs the reference venv (see hack/README.md). Deterministic: rerunning gives
byte-identical files.

usage: hack/make-goldens.py [tiny|smollm2 ...]   (no argument: both)
"""

import copy
import glob
import json
import math
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
GOLDENS = os.path.join(FIXTURES, "goldens")
TINY_DIR = os.path.join(FIXTURES, "tiny-llama")
SPBPE_DIR = os.path.join(FIXTURES, "tokenizer", "spbpe")
SMOL_TOKENIZER = os.path.join(FIXTURES, "tokenizer", "smollm2", "tokenizer.json")
SMOL_GGUF_DIR = os.path.join(ROOT, "models")
SMOL_GGUF = "smollm2-135m-instruct-q4_1.gguf"

NEW_TOKENS = 32
MIN_REL_GAP = 1e-3
REFERENCE = "transformers %s, torch %s" % (
    transformers.__version__,
    torch.__version__.split("+")[0],
)


def rel(path):
    return os.path.relpath(path, ROOT)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


def f32(x):
    """A Python float holding exactly the float32 value x."""
    return float(np.float32(x))


# ---------------------------------------------------------------------------
# Reference decoding


@torch.no_grad()
def greedy(model, ids, n=NEW_TOKENS):
    """Runs ids through model, then n argmax steps over the KV cache.

    Returns (prompt last-position logits as float32 numpy, the n tokens,
    smallest top-2 gap, smallest top-2 gap relative to the logit range)."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    first = out.logits[0, -1].to(torch.float32).clone()
    logits, past = first, out.past_key_values
    tokens, min_gap, min_rel = [], math.inf, math.inf
    for step in range(n):
        top = torch.topk(logits, 2)
        gap = float(top.values[0] - top.values[1])
        span = float(logits.max() - logits.min())
        min_gap = min(min_gap, gap)
        min_rel = min(min_rel, gap / span if span > 0 else 0.0)
        tok = int(top.indices[0])
        tokens.append(tok)
        if step + 1 == n:
            break
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        logits, past = out.logits[0, -1].to(torch.float32), out.past_key_values
    return first.numpy().astype("<f4"), tokens, min_gap, min_rel


def run_prompts(model, encode, texts, name, logits_out):
    """Greedy-decodes each text; with logits_out (a dict), also collects each
    prompt's last-position logits there under its file name.

    Returns the golden entries, or raises ValueError naming the first prompt
    whose greedy path has a near-tie."""
    entries = []
    for i, text in enumerate(texts):
        ids = encode(text)
        logits, toks, gap, gap_rel = greedy(model, ids)
        if not gap_rel > MIN_REL_GAP:
            raise ValueError("%s prompt %r: top-2 gap %.3g is %.3g of the logit range"
                             % (name, text[:40], gap, gap_rel))
        e = {"text": text, "ids": ids, "greedy": toks}
        if logits_out is not None:
            fname = "%s-%d.f32" % (name, i)
            e["logits_file"] = fname
            e["logit_min"] = f32(logits.min())
            e["logit_max"] = f32(logits.max())
            logits_out[fname] = logits
        e["min_top2_gap"] = f32(gap)
        e["min_top2_gap_rel"] = f32(gap_rel)
        entries.append(e)
    return entries


def write_goldens(name, doc, logits):
    os.makedirs(GOLDENS, exist_ok=True)
    for old in glob.glob(os.path.join(GOLDENS, name + "-*.f32")):
        os.remove(old)
    for fname, arr in logits.items():
        arr.tofile(os.path.join(GOLDENS, fname))
    write_json(os.path.join(GOLDENS, name + ".json"), doc)


def batch_prompts(prompts, extra):
    """The batch set: the main prompts (without their logits) and extra ones."""
    keep = ("text", "ids", "greedy", "min_top2_gap", "min_top2_gap_rel")
    return [{k: e[k] for k in keep} for e in prompts] + extra


def batch_entry(entries):
    return {
        "note": "each prompt decoded alone (batch size 1); a batched run of all "
        "of them must give the same greedy tokens",
        "prompts": entries,
    }


def setup_torch():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------------------
# tiny-llama

TINY_SEEDS = range(1000, 3000)
TINY_STD = 0.25  # embeddings and projections; 0.02 gives near-uniform logits
TINY_NORM_STD = 0.1  # RMSNorm weights are 1 + N(0, this), so they matter
TINY_SHARD_BYTES = 200 * 1000  # the bf16 weights are ~300 kB: two shards

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "max_position_embeddings": 256,
    "initializer_range": TINY_STD,
    "pretraining_tp": 1,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}

TINY_PROMPTS = [
    "",  # BOS alone: a one-token prompt
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, 3 people flew to the moon & back!",
    "Café, naïve résumé — 東京 🚀",
    "Once upon a time there was a little girl who lived in a village near the "
    "forest, and everyone called her Red Riding Hood.",
]
TINY_BATCH_EXTRA = [
    "water",
    "What would you write if you could find the right words for them?",
]


def llama3_inv_freq(cfg):
    """The llama3 RoPE frequencies, written out from the formula (a check on
    how transformers read config.json)."""
    rs = cfg["rope_scaling"]
    d = cfg["head_dim"]
    inv = [1.0 / cfg["rope_theta"] ** (2 * i / d) for i in range(d // 2)]
    old = rs["original_max_position_embeddings"]
    lo_wl = old / rs["low_freq_factor"]
    hi_wl = old / rs["high_freq_factor"]
    res = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl < hi_wl:
            res.append(f)
        elif wl > lo_wl:
            res.append(f / rs["factor"])
        else:
            s = (old / wl - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
            res.append((1 - s) * f / rs["factor"] + s * f)
    return torch.tensor(res, dtype=torch.float32)


def tiny_build(seed, cfg_dict, out_dir):
    """Initialises the model from seed and saves it (bf16, two shards)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**copy.deepcopy(cfg_dict))
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + TINY_NORM_STD * torch.randn(p.shape))
            else:
                p.copy_(TINY_STD * torch.randn(p.shape))
    model = model.to(torch.bfloat16)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, max_shard_size=TINY_SHARD_BYTES, safe_serialization=True)
    # config.json as hub checkpoints write it (rope_theta + rope_scaling,
    # torch_dtype), not in the newer rope_parameters form.
    conf = dict(cfg_dict)
    conf["transformers_version"] = transformers.__version__
    write_json(os.path.join(out_dir, "config.json"), conf)
    gen = GenerationConfig(bos_token_id=cfg_dict["bos_token_id"], eos_token_id=cfg_dict["eos_token_id"])
    gen.save_pretrained(out_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(SPBPE_DIR, f), os.path.join(out_dir, f))
    for f in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, f), 0o644)


def tiny_check_saved(out_dir, cfg_dict, model):
    shards = sorted(glob.glob(os.path.join(out_dir, "*.safetensors")))
    if len(shards) != 2:
        raise SystemExit("tiny-llama: expected 2 shards, got %d" % len(shards))
    with open(os.path.join(out_dir, "model.safetensors.index.json")) as f:
        index = json.load(f)
    names = set()
    for s in shards:
        with safetensors.safe_open(s, "pt") as st:
            for k in st.keys():
                if st.get_slice(k).get_dtype() != "BF16":
                    raise SystemExit("tiny-llama: %s is not BF16" % k)
                if index["weight_map"].get(k) != os.path.basename(s):
                    raise SystemExit("tiny-llama: index does not map %s to %s" % (k, s))
                names.add(k)
    if names != set(index["weight_map"]):
        raise SystemExit("tiny-llama: index and shards list different tensors")
    if "lm_head.weight" not in names:
        raise SystemExit("tiny-llama: lm_head.weight missing (embeddings must be untied)")
    got = model.model.rotary_emb.inv_freq.to(torch.float32)
    want = llama3_inv_freq(cfg_dict)
    if not torch.allclose(got, want, rtol=1e-6, atol=0):
        raise SystemExit("tiny-llama: transformers' RoPE frequencies differ from llama3 scaling")
    if model.model.embed_tokens.weight.data_ptr() == model.lm_head.weight.data_ptr():
        raise SystemExit("tiny-llama: embeddings came back tied")
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out_dir, "*")))
    if total >= 1000 * 1000:
        raise SystemExit("tiny-llama: directory is %d bytes, over 1 MB" % total)


def make_tiny():
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if not os.path.isfile(os.path.join(SPBPE_DIR, f)):
            raise SystemExit("tiny-llama: %s missing; run hack/make-tokenizer-fixtures.py spbpe first"
                             % rel(os.path.join(SPBPE_DIR, f)))
    tok = tokenizers.Tokenizer.from_file(os.path.join(SPBPE_DIR, "tokenizer.json"))
    with open(os.path.join(SPBPE_DIR, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    cfg_dict = dict(TINY_CONFIG)
    cfg_dict["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    cfg_dict["bos_token_id"] = tok.token_to_id(tcfg["bos_token"])
    cfg_dict["eos_token_id"] = tok.token_to_id(tcfg["eos_token"])

    def encode(text):
        return tok.encode(text, add_special_tokens=True).ids

    rejected = 0
    for seed in TINY_SEEDS:
        tiny_build(seed, cfg_dict, TINY_DIR)
        model = AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float32)
        model.eval()
        tiny_check_saved(TINY_DIR, cfg_dict, model)
        logits = {}
        try:
            prompts = run_prompts(model, encode, TINY_PROMPTS, "tiny-llama", logits)
            batch = batch_prompts(prompts, run_prompts(model, encode, TINY_BATCH_EXTRA, "tiny-llama", None))
        except ValueError:
            rejected += 1
            continue
        break
    else:
        raise SystemExit("tiny-llama: no seed gave well-separated greedy steps")

    doc = {
        "model": rel(TINY_DIR),
        "reference": REFERENCE,
        "tokenizer": "%s via tokenizers %s, add_special_tokens=True"
        % (rel(os.path.join(TINY_DIR, "tokenizer.json")), tokenizers.__version__),
        "dtype": "bf16 weights, computed in float32",
        "seed": seed,
        "init_std": TINY_STD,
        "vocab_size": cfg_dict["vocab_size"],
        "eos_token_id": cfg_dict["eos_token_id"],
        "prompts": prompts,
        "batch": batch_entry(batch),
    }
    write_goldens("tiny-llama", doc, logits)
    print("tiny-llama: seed %d (%d earlier seeds had near-ties), %d prompts, %d batch prompts"
          % (seed, rejected, len(prompts), len(batch)))


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32 by transformers)

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(user):
    return ("<|im_start|>system\n%s<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n"
            "<|im_start|>assistant\n" % (SMOL_SYSTEM, user))


# Chosen so that no greedy step is a near-tie (several natural prompts, e.g.
# "The year 2024 had 366 days because", are not).
SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    chatml("What is the capital of France?"),
    chatml("What is the boiling point of water in Celsius?"),
    "The largest planet in the solar system is",
    "Photosynthesis is the process by which green plants, algae and some "
    "bacteria turn light into chemical energy. In the chloroplasts, chlorophyll "
    "absorbs mostly red and blue light and uses its energy to split water "
    "molecules, releasing oxygen as a by-product. The energy is stored in two "
    "carrier molecules, ATP and NADPH, which then drive the Calvin cycle: carbon "
    "dioxide from the air is fixed into three-carbon sugars. Taken together, the "
    "overall reaction can be summarised as",
]
SMOL_BATCH_EXTRA = [
    "Hello",
    "import numpy as np\n\ndef softmax(x):",
]


def make_smollm2():
    gguf_path = os.path.join(SMOL_GGUF_DIR, SMOL_GGUF)
    if not os.path.isfile(gguf_path):
        raise SystemExit("smollm2: %s missing; run hack/deps.sh" % rel(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(SMOL_GGUF_DIR, gguf_file=SMOL_GGUF, dtype=torch.float32)
    model.eval()
    gguf_tok = AutoTokenizer.from_pretrained(SMOL_GGUF_DIR, gguf_file=SMOL_GGUF)

    def gguf_encode(text):
        return gguf_tok(text, add_special_tokens=True)["input_ids"]

    if os.path.isfile(SMOL_TOKENIZER):
        tok = tokenizers.Tokenizer.from_file(SMOL_TOKENIZER)

        def encode(text):
            return tok.encode(text, add_special_tokens=True).ids

        tok_name = "%s via tokenizers %s, add_special_tokens=True" % (rel(SMOL_TOKENIZER), tokenizers.__version__)
        for text in SMOL_PROMPTS + SMOL_BATCH_EXTRA:
            if encode(text) != gguf_encode(text):
                print("smollm2: warning: %s and the GGUF tokenizer disagree on %r"
                      % (rel(SMOL_TOKENIZER), text[:40]), file=sys.stderr)
    else:
        encode = gguf_encode
        tok_name = "transformers %s tokenizer built from %s metadata, add_special_tokens=True" % (
            transformers.__version__, rel(gguf_path))

    logits = {}
    prompts = run_prompts(model, encode, SMOL_PROMPTS, "smollm2", logits)
    batch = batch_prompts(prompts, run_prompts(model, encode, SMOL_BATCH_EXTRA, "smollm2", None))
    doc = {
        "model": rel(gguf_path),
        "reference": REFERENCE,
        "tokenizer": tok_name,
        "dtype": "GGUF weights dequantized to float32 by transformers, computed in float32",
        "vocab_size": int(model.config.vocab_size),
        "eos_token_id": int(gguf_tok.eos_token_id),
        "prompts": prompts,
        "batch": batch_entry(batch),
    }
    write_goldens("smollm2", doc, logits)
    print("smollm2: %d prompts, %d batch prompts, tokenizer: %s" % (len(prompts), len(batch), tok_name))


def main(argv):
    jobs = {"tiny": make_tiny, "smollm2": make_smollm2}
    wanted = argv[1:] or list(jobs)
    for w in wanted:
        if w not in jobs:
            raise SystemExit("usage: hack/make-goldens.py [tiny|smollm2 ...]")
    setup_torch()
    for w in wanted:
        jobs[w]()


if __name__ == "__main__":
    main(sys.argv)
