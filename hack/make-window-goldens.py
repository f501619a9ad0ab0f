#!/usr/bin/env python3
"""Builds tiny random models with sliding-window attention and their
reference outputs.

  tests/fixtures/tiny-mistral-window/   a Mistral (Llama layout, every layer
                                        windowed) with sliding_window 24
  tests/fixtures/tiny-qwen2-window/     a Qwen2 with use_sliding_window,
                                        sliding_window 24 and
                                        max_window_layers 1: layer 0 full,
                                        layer 1 windowed
  tests/fixtures/goldens/<model>.json, <model>-<i>.f32
                                        prompt ids, 32 greedy tokens and the
                                        prompt's last-position logits from
                                        transformers in float32 on the CPU

Both are saved by transformers (bf16 model.safetensors, config.json in the
hub's form) with the spbpe test tokenizer (tests/fixtures/tokenizer/spbpe/,
as tiny-llama). The window (24) is shorter than every prompt but the first,
and the 32 generated tokens take every prompt past it; the prompts run to
160 tokens, so contexts cross the CPU attention's 64-position chunks and the
16-position cache blocks at many offsets.

The goldens have the layout of tiny-llama.json (hack/README.md) plus
"sliding_window", "layer_windows" (each layer's window, 0: full) and
"checks" (what the script verified before writing):

  - the greedy loop over transformers' KV cache and one forward pass over
    the whole 32-token continuation agree on every token;
  - a forward pass written here (float64, the mask spelled out: position q
    sees key k when q - window < k <= q, per layer) gives the same
    last-position logits within 1e-5 of the range;
  - the window matters: with sliding_window null (full attention) the
    last-position logits of every prompt longer than the window differ by
    more than 1e-2 of the range, and most prompts' greedy tokens change.

Needs the reference venv (hack/README.md). Deterministic: rerunning gives
byte-identical files.

usage: hack/make-window-goldens.py [mistral|qwen2 ...]   (no argument: both)
"""

import copy
import glob
import json
import os
import shutil
import sys

sys.dont_write_bytecode = True

HACK = os.path.dirname(os.path.abspath(__file__))


from sibling import load_script  # noqa: E402


# make-goldens.py sets the offline / single-thread environment and has the
# greedy loop and the goldens layout
mg = load_script("make_goldens", "make-goldens.py")

import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = mg.ROOT
FIXTURES = mg.FIXTURES
GOLDENS = mg.GOLDENS
SPBPE_DIR = mg.SPBPE_DIR

WINDOW = 24
STD = 0.25  # projections, embeddings and biases, as tiny-llama
NORM_STD = 0.1  # RMSNorm weights are 1 + N(0, this)
MAX_DIR_BYTES = 1000 * 1000

COMMON = {
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": STD,
    "intermediate_size": 160,
    "max_position_embeddings": 256,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}

MODELS = {
    "mistral": {
        "name": "tiny-mistral-window",
        "config": dict(COMMON, **{
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "head_dim": 16,
            "rope_theta": 10000.0,
            "sliding_window": WINDOW,
        }),
        "layer_windows": [WINDOW, WINDOW],
        "seeds": range(4000, 6000),
        "features": "Mistral: GQA 4/2 heads of 16, untied embeddings, sliding_window 24 on every layer",
    },
    "qwen2": {
        "name": "tiny-qwen2-window",
        "config": dict(COMMON, **{
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "max_window_layers": 1,
            "rope_theta": 1000000.0,
            "sliding_window": WINDOW,
            "use_sliding_window": True,
        }),
        "layer_windows": [0, WINDOW],
        "seeds": range(6000, 8000),
        "features": "Qwen2: q/k/v biases, GQA 4/2 heads of 16, untied embeddings, use_sliding_window "
        "with sliding_window 24 and max_window_layers 1 (layer 0 full, layer 1 windowed)",
    },
}

# Token counts with the spbpe tokenizer (BOS included): 6, 33, 64, 101,
# 127 and 160; the batch adds 4 and 51.
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little girl who lived in a village near the "
    "forest, and everyone called her Red Riding Hood.",
    "In 1969, 3 people flew to the moon & back! They left from Florida, spent a "
    "week in space, and came home to a parade in New York, where the whole city "
    "cheered for them.",
    "The river ran past the old mill and under the stone bridge, where the "
    "children stopped every morning to watch the water before school began. In "
    "spring it rose over the meadow, and in winter it froze so hard that the "
    "baker drove his cart across it.",
    "She packed a small bag with bread, cheese and apples, put on her red hood, "
    "kissed her mother goodbye and walked into the forest, singing a song about "
    "the sun. The path was long and the trees were tall, and soon she met a wolf "
    "who asked her, very politely, where she was going on such a fine morning "
    "with her basket.",
]
BATCH_EXTRA = [
    "water",
    "What would you write if you could find the right words for them? Perhaps a "
    "letter to an old friend.",
]


def rel(path):
    return os.path.relpath(path, ROOT)


# ---------------------------------------------------------------------------
# Model


def build(seed, cfg_dict, out_dir):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**copy.deepcopy(cfg_dict))
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * torch.randn(p.shape))
            else:
                p.copy_(STD * torch.randn(p.shape))
    model = model.to(torch.bfloat16)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    conf = dict(cfg_dict)
    conf["transformers_version"] = transformers.__version__
    mg.write_json(os.path.join(out_dir, "config.json"), conf)
    gen = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(SPBPE_DIR, f), os.path.join(out_dir, f))
    for f in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, f), 0o644)


def check_saved(key, out_dir, model):
    spec = MODELS[key]
    files = sorted(os.listdir(out_dir))
    want = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    if files != want:
        raise SystemExit("%s: files %s, expected %s" % (spec["name"], files, want))
    with safetensors.safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as st:
        for k in st.keys():
            if st.get_slice(k).get_dtype() != "BF16":
                raise SystemExit("%s: %s is not BF16" % (spec["name"], k))
    # what transformers made of config.json: the windows of spec
    got = []
    for i, layer in enumerate(model.model.layers):
        w = getattr(layer.self_attn, "sliding_window", None)
        if w is None and key == "mistral":
            w = model.config.sliding_window
        got.append(w or 0)
    if got != spec["layer_windows"]:
        raise SystemExit("%s: transformers windows the layers %s, expected %s"
                         % (spec["name"], got, spec["layer_windows"]))
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out_dir, "*")))
    if total >= MAX_DIR_BYTES:
        raise SystemExit("%s: directory is %d bytes, over 1 MB" % (spec["name"], total))


# ---------------------------------------------------------------------------
# Checks


@torch.no_grad()
def whole_sequence_tokens(model, ids, greedy):
    """The argmax at every position of one forward pass over prompt +
    greedy[:-1]: must be greedy (the KV cache's window and the mask's
    agree)."""
    seq = list(ids) + list(greedy[:-1])
    logits = model(input_ids=torch.tensor([seq])).logits[0]
    return [int(t) for t in logits[len(ids) - 1:].argmax(-1)]


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


@torch.no_grad()
def own_forward(model, cfg, windows, ids):
    """Last-position logits of ids, float64, written out from the
    architecture: RMSNorm, q/k/v (with Qwen2's biases), rotate-half RoPE,
    grouped-query attention with the mask of each layer spelled out (q sees
    k when k <= q and, for a windowed layer, q - window < k), SwiGLU."""
    sd = {k: v.to(torch.float64) for k, v in model.state_dict().items()}
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim", cfg["hidden_size"] // nh)
    eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
    n = len(ids)
    pos = torch.arange(n, dtype=torch.float64)
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):  # [heads, n, hd]
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = sd["model.embed_tokens.weight"][torch.tensor(ids)]
    q_idx, k_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    for li in range(cfg["num_hidden_layers"]):
        p = "model.layers.%d." % li
        h = rms(x, sd[p + "input_layernorm.weight"], eps)

        def proj(name):
            y = h @ sd[p + "self_attn.%s.weight" % name].T
            b = sd.get(p + "self_attn.%s.bias" % name)
            return y + b if b is not None else y
        q = proj("q_proj").view(n, nh, hd).transpose(0, 1)
        k = proj("k_proj").view(n, nkv, hd).transpose(0, 1)
        v = proj("v_proj").view(n, nkv, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(nh // nkv, 0)
        v = v.repeat_interleave(nh // nkv, 0)
        see = k_idx <= q_idx
        if windows[li]:
            see = see & (q_idx - windows[li] < k_idx)
        s = q @ k.transpose(1, 2) / hd ** 0.5
        s = s.masked_fill(~see, float("-inf"))
        a = torch.softmax(s, -1) @ v
        x = x + a.transpose(0, 1).reshape(n, nh * hd) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        g = h @ sd[p + "mlp.gate_proj.weight"].T
        u = h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ sd[p + "mlp.down_proj.weight"].T
    x = rms(x, sd["model.norm.weight"], eps)
    return (x[-1] @ sd["lm_head.weight"].T).numpy()


def full_attention_model(out_dir):
    """The same weights with sliding_window null: full attention."""
    cfg = transformers.AutoConfig.from_pretrained(out_dir)
    cfg.sliding_window = None
    if hasattr(cfg, "layer_types"):
        cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    m = AutoModelForCausalLM.from_pretrained(out_dir, config=cfg, dtype=torch.float32)
    m.eval()
    return m


def check(key, model, out_dir, prompts, logits):
    spec = MODELS[key]
    cfg = spec["config"]
    worst_own = 0.0
    for p in prompts:
        if whole_sequence_tokens(model, p["ids"], p["greedy"]) != p["greedy"]:
            raise SystemExit("%s: the KV-cache greedy loop and a whole-sequence forward pass disagree"
                             % spec["name"])
    for p in prompts:
        if "logits_file" not in p:
            continue
        want = logits[p["logits_file"]]
        got = own_forward(model, cfg, spec["layer_windows"], p["ids"])
        d = float(np.max(np.abs(got - want))) / (p["logit_max"] - p["logit_min"])
        if d > 1e-5:
            raise SystemExit("%s: the script's own forward pass differs from transformers by %.3g of "
                             "the range on %r" % (spec["name"], d, p["text"][:30]))
        worst_own = max(worst_own, d)
    full = full_attention_model(out_dir)
    changed, smallest = 0, None
    for p in prompts:
        first, toks, _, _ = mg.greedy(full, p["ids"])
        changed += toks != p["greedy"]
        if "logits_file" in p and len(p["ids"]) > WINDOW:
            want = logits[p["logits_file"]]
            d = float(np.max(np.abs(first - want))) / (p["logit_max"] - p["logit_min"])
            smallest = d if smallest is None else min(smallest, d)
            if d <= 1e-2:
                raise SystemExit("%s: prompt %r: full attention gives nearly the same logits (%.3g of "
                                 "the range)" % (spec["name"], p["text"][:30], d))
    if changed * 2 <= len(prompts):
        raise SystemExit("%s: full attention changes the greedy tokens of only %d of %d prompts"
                         % (spec["name"], changed, len(prompts)))
    return {
        "cache_vs_whole_sequence": "the greedy loop over the KV cache and one forward pass over "
        "prompt + continuation give the same tokens on every prompt",
        "own_forward": "a float64 forward pass with the mask written out (q sees k when "
        "q - window < k <= q on windowed layers) matches the last-position logits within "
        "%.2e of the range" % worst_own,
        "full_attention": "with sliding_window null the last-position logits of the prompts longer "
        "than the window differ by at least %.3f of the range, and %d of %d prompts' greedy tokens "
        "change" % (smallest, changed, len(prompts)),
    }


# ---------------------------------------------------------------------------


def make(key):
    spec = MODELS[key]
    name = spec["name"]
    out_dir = os.path.join(FIXTURES, name)
    tok = tokenizers.Tokenizer.from_file(os.path.join(SPBPE_DIR, "tokenizer.json"))
    with open(os.path.join(SPBPE_DIR, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    cfg = dict(spec["config"])
    cfg["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    cfg["bos_token_id"] = tok.token_to_id(tcfg["bos_token"])
    cfg["eos_token_id"] = tok.token_to_id(tcfg["eos_token"])
    spec["config"] = cfg

    def encode(text):
        return tok.encode(text, add_special_tokens=True).ids

    for text in PROMPTS[1:]:
        if len(encode(text)) <= WINDOW:
            raise SystemExit("%s: prompt %r is not longer than the window" % (name, text[:30]))
    if max(len(encode(t)) for t in PROMPTS + BATCH_EXTRA) + mg.NEW_TOKENS > cfg["max_position_embeddings"]:
        raise SystemExit("%s: a prompt and its continuation exceed the context" % name)
    rejected = 0
    for seed in spec["seeds"]:
        build(seed, cfg, out_dir)
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        model.eval()
        check_saved(key, out_dir, model)
        logits = {}
        try:
            prompts = mg.run_prompts(model, encode, PROMPTS, name, logits)
            batch = mg.batch_prompts(prompts, mg.run_prompts(model, encode, BATCH_EXTRA, name, None))
        except ValueError:
            rejected += 1
            continue
        break
    else:
        raise SystemExit("%s: no seed gave well-separated greedy steps" % name)
    checks = check(key, model, out_dir, prompts + batch[len(prompts):], logits)
    doc = {
        "model": rel(out_dir),
        "reference": mg.REFERENCE,
        "tokenizer": "%s via tokenizers %s, add_special_tokens=True"
        % (rel(os.path.join(out_dir, "tokenizer.json")), tokenizers.__version__),
        "dtype": "bf16 weights, computed in float32",
        "features": spec["features"],
        "sliding_window": WINDOW,
        "layer_windows": spec["layer_windows"],
        "seed": seed,
        "init_std": STD,
        "vocab_size": cfg["vocab_size"],
        "eos_token_id": cfg["eos_token_id"],
        "checks": checks,
        "prompts": prompts,
        "batch": mg.batch_entry(batch),
    }
    mg.write_goldens(name, doc, logits)
    print("%s: seed %d (%d earlier seeds had near-ties), prompts of %s tokens, %d bytes; %s"
          % (name, seed, rejected, [len(p["ids"]) for p in batch],
             sum(os.path.getsize(p) for p in glob.glob(os.path.join(out_dir, "*"))),
             checks["full_attention"]))


def main(argv):
    wanted = argv[1:] or list(MODELS)
    for k in wanted:
        if k not in MODELS:
            raise SystemExit("usage: hack/make-window-goldens.py [%s ...]" % "|".join(MODELS))
    mg.setup_torch()
    for k in wanted:
        make(k)


if __name__ == "__main__":
    main(sys.argv)
