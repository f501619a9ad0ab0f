#!/usr/bin/env python3
"""Builds GGUF variants of the tiny test model and their reference outputs.

  tests/fixtures/tiny-gguf/tiny-llama-<type>.gguf   type: f32 f16 bf16 q8_0 q4_0 q4_1
                                                          q5_0 q5_1
  tests/fixtures/goldens/tiny-gguf-<type>.json, tiny-gguf-<type>-<i>.f32

Each GGUF file is tests/fixtures/tiny-llama converted the way llama.cpp's
convert_hf_to_gguf.py converts a Llama: the same metadata keys and tensor
names, Q and K rows permuted per head into llama.cpp's interleaved rotary
layout, 1-D tensors (the RMSNorm weights) in F32 and every matrix (embeddings
and output included) in the file's type, and the llama3 RoPE scaling
expressed as llama.cpp expresses it: no scaling key, but a `rope_freqs.weight`
F32 tensor of head_dim/2 divisors of the base frequencies, computed as
convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors computes them
(float32 torch arithmetic). The tokenizer metadata (tokenizer.ggml.* and
tokenizer.chat_template) is copied from tests/fixtures/tokenizer/gguf/
spbpe.gguf, made from the same spbpe tokenizer the tiny model carries.

One deliberate difference: generate_extra_tensors reads
original_max_position_embeddings from the top level of the HF config
(default 8192), but transformers keeps it inside rope_scaling (here 64). For
real Llama 3.x checkpoints both are 8192; for this model the top-level lookup
would describe a different model than the HF one. The divisors here use the
value from rope_scaling, so the GGUF files hold the model HF transformers runs.

The goldens have the layout of tests/fixtures/goldens/tiny-llama.json (see
hack/README.md), without the "batch" part. transformers 5.x loads these files
(it dequantizes and undoes the Q/K permutation) but ignores rope_freqs for
the llama architecture, so it would run the model without its RoPE scaling.
The reference is therefore a float64 numpy forward pass of this script over
the weights that gguf.quants.dequantize reads back from each file, with the
rotary frequencies base^(-2i/d) / rope_freqs[i]. It is checked twice:
  - against transformers: the state dict transformers loads from each GGUF
    file must equal this script's dequantized, un-permuted weights bit for
    bit, and transformers' float32 forward pass, with its inv_freq set from
    rope_freqs, must give the same greedy tokens and logits within 1e-4 of
    the range (the measured differences go into the goldens file);
  - the F32 file holds exactly the bf16 model, so its reference must give
    the greedy tokens of tests/fixtures/goldens/tiny-llama.json and logits
    within 1e-4 of the range.
Prompts whose greedy path has a near-tie (top-2 gap not above 1e-3 of the
logit range at some step) are skipped in favour of the next candidate.

Needs the reference venv (see hack/README.md) and the committed tiny model
and spbpe.gguf. Deterministic: rerunning gives byte-identical files.

usage: hack/make-gguf-fixtures.py [type ...]   (no argument: all eight)
"""

import glob
import importlib.metadata
import json
import math
import os
import sys

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TQDM_DISABLE", "1")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
TINY_DIR = os.path.join(FIXTURES, "tiny-llama")
SPBPE_GGUF = os.path.join(FIXTURES, "tokenizer", "gguf", "spbpe.gguf")
OUT_DIR = os.path.join(FIXTURES, "tiny-gguf")
GOLDENS = os.path.join(FIXTURES, "goldens")
TINY_GOLDENS = os.path.join(GOLDENS, "tiny-llama.json")

NEW_TOKENS = 32
MIN_REL_GAP = 1e-3
MAX_PROMPTS = 6
MIN_PROMPTS = 3
CROSS_CHECK_REL = 1e-4  # transformers f32 vs this float64 reference

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
TYPES = {
    "f32": (Q.F32, FT.ALL_F32),
    "f16": (Q.F16, FT.MOSTLY_F16),
    "bf16": (Q.BF16, FT.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, FT.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, FT.MOSTLY_Q4_1),
    # Q4_K_M / Q5_K_M files fall back to these for matrices whose rows are
    # not whole 256-weight K-quant blocks (the tiny model's 64 and 160)
    "q5_0": (Q.Q5_0, FT.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, FT.MOSTLY_Q5_1),
}

# The tiny-llama golden prompts first (same texts, so the F32 file can be
# compared with those goldens), then spares for variants where one of them
# is a near-tie.
PROMPTS = [
    "",  # BOS alone: a one-token prompt
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, 3 people flew to the moon & back!",
    "Café, naïve résumé — 東京 🚀",
    "Once upon a time there was a little girl who lived in a village near the "
    "forest, and everyone called her Red Riding Hood.",
    "water",
    "What would you write if you could find the right words for them?",
    "A journey of a thousand miles begins with a single step.",
    "x = 42; y = x * 2",
    "Rain, snow and hail are all forms of precipitation.",
    "She sells sea shells by the sea shore.",
    "The cat sat on the mat.",
    "Good morning! How are you today?",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "Light travels faster than sound.",
    "Où est la bibliothèque ?",
    "Bread, butter, jam and honey.",
    "To be or not to be, that is the question.",
    "The river flows quietly under the old stone bridge.",
]

HF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def rel(path):
    return os.path.relpath(path, ROOT)


def f32(x):
    """A Python float holding exactly the float32 value x."""
    return float(np.float32(x))


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")


# ---------------------------------------------------------------------------
# HF model -> GGUF


def gguf_name(hf):
    if hf in HF_NAMES:
        return HF_NAMES[hf]
    parts = hf.split(".")
    if parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in LAYER_NAMES:
        raise SystemExit("tiny-gguf: no GGUF name for tensor %s" % hf)
    return "blk.%s.%s" % (parts[2], LAYER_NAMES[".".join(parts[3:])])


def permute(w, n_head):
    """HF rows -> llama.cpp rows, as convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head):
    """The inverse: llama.cpp rows -> HF rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_hf_tensors():
    """The tiny model's tensors as float32 numpy arrays, in file order
    (shards in name order, each shard's tensors in its own order), which is
    the order convert_hf_to_gguf.py writes them in."""
    out = []
    for shard in sorted(glob.glob(os.path.join(TINY_DIR, "*.safetensors"))):
        with safetensors.safe_open(shard, "pt") as st:
            for name in st.keys():
                out.append((name, st.get_tensor(name).to(torch.float32).numpy()))
    return out


def llama3_rope_factors(cfg):
    """rope_freqs: the divisors of each base frequency, float32, computed as
    convert_hf_to_gguf.py does (torch float32 arithmetic), except that
    original_max_position_embeddings comes from rope_scaling (see above)."""
    rs = cfg["rope_scaling"]
    base = cfg["rope_theta"]
    dim = cfg["head_dim"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rs["factor"]
    low = rs["low_freq_factor"]
    high = rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_wl = old_ctx / low
    high_wl = old_ctx / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wl:
            factors.append(1)
        elif wavelen > low_wl:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def tokenizer_fields():
    """(key, value, type, sub_type) for every tokenizer key of spbpe.gguf."""
    r = gguf.GGUFReader(SPBPE_GGUF)
    out = []
    for key, field in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                val = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                val = [field.parts[i].tolist()[0] for i in field.data]
            out.append((key, val, vtype, sub))
        elif vtype == gguf.GGUFValueType.STRING:
            out.append((key, bytes(field.parts[field.data[0]]).decode("utf-8"), vtype, None))
        else:
            out.append((key, field.parts[field.data[0]].tolist()[0], vtype, None))
    if not any(k == "tokenizer.ggml.tokens" for k, _, _, _ in out):
        raise SystemExit("tiny-gguf: %s has no tokenizer.ggml.tokens" % rel(SPBPE_GGUF))
    return out


def write_gguf(path, cfg, tensors, qtype, ftype, rope_factors, tok_fields):
    w = gguf.GGUFWriter(path, "llama")
    w.add_type("model")
    w.add_name("tiny-llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_file_type(ftype)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, val, vtype, sub in tok_fields:
        w.add_key_value(key, val, vtype, sub_type=sub)

    # generate_extra_tensors comes first in convert_hf_to_gguf.py
    w.add_tensor("rope_freqs.weight", rope_factors.astype(np.float32), raw_dtype=Q.F32)
    for hf, data in tensors:
        name = gguf_name(hf)
        if hf.endswith("q_proj.weight"):
            data = permute(data, cfg["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            data = permute(data, cfg["num_key_value_heads"])
        t = Q.F32 if data.ndim == 1 else qtype
        w.add_tensor(name, gguf.quants.quantize(data, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.chmod(path, 0o644)


# ---------------------------------------------------------------------------
# Reading a GGUF file back and the float64 reference


def read_gguf(path, cfg):
    """{HF name: float32 weights in HF layout}, rope_freqs, {HF name: type}."""
    r = gguf.GGUFReader(path)
    inv = {v: k for k, v in HF_NAMES.items()}
    for l in range(cfg["num_hidden_layers"]):
        for hf, g in LAYER_NAMES.items():
            inv["blk.%d.%s" % (l, g)] = "model.layers.%d.%s" % (l, hf)
    weights, types, freqs = {}, {}, None
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name == "rope_freqs.weight":
            freqs = data.reshape(-1)
            continue
        hf = inv[t.name]
        if hf.endswith("q_proj.weight"):
            data = unpermute(data, cfg["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            data = unpermute(data, cfg["num_key_value_heads"])
        weights[hf] = np.ascontiguousarray(data)
        types[hf] = t.tensor_type.name
    if freqs is None:
        raise SystemExit("tiny-gguf: %s has no rope_freqs.weight" % rel(path))
    return weights, freqs, types


class Reference:
    """A float64 Llama forward pass with a KV cache, one token at a time."""

    def __init__(self, cfg, weights, rope_factors):
        self.cfg = cfg
        self.w = {k: v.astype(np.float64) for k, v in weights.items()}
        d = cfg["head_dim"]
        base = np.float64(cfg["rope_theta"])
        self.inv_freq = base ** (-np.arange(0, d, 2, dtype=np.float64) / d) / rope_factors.astype(np.float64)

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x) + self.cfg["rms_norm_eps"]) * w

    def rope(self, x, pos):
        # x [heads, head_dim], "rotate half" layout
        half = x.shape[1] // 2
        ang = pos * self.inv_freq
        c, s = np.cos(ang), np.sin(ang)
        a, b = x[:, :half], x[:, half:]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=1)

    def step(self, tok, cache):
        """Runs one token at position len(cache[0][0]); returns its logits."""
        cfg, w = self.cfg, self.w
        nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        pos = len(cache[0][0])
        x = w["model.embed_tokens.weight"][tok].copy()
        for l in range(cfg["num_hidden_layers"]):
            p = "model.layers.%d." % l
            h = self.rmsnorm(x, w[p + "input_layernorm.weight"])
            q = (w[p + "self_attn.q_proj.weight"] @ h).reshape(nh, hd)
            k = (w[p + "self_attn.k_proj.weight"] @ h).reshape(nkv, hd)
            v = (w[p + "self_attn.v_proj.weight"] @ h).reshape(nkv, hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            cache[l][0].append(k)
            cache[l][1].append(v)
            keys, vals = np.stack(cache[l][0]), np.stack(cache[l][1])  # [pos+1, nkv, hd]
            out = np.empty((nh, hd))
            for head in range(nh):
                kv = head // (nh // nkv)
                s = keys[:, kv, :] @ q[head] / math.sqrt(hd)
                e = np.exp(s - s.max())
                out[head] = (e / e.sum()) @ vals[:, kv, :]
            x = x + w[p + "self_attn.o_proj.weight"] @ out.reshape(-1)
            h = self.rmsnorm(x, w[p + "post_attention_layernorm.weight"])
            g = w[p + "mlp.gate_proj.weight"] @ h
            u = w[p + "mlp.up_proj.weight"] @ h
            x = x + w[p + "mlp.down_proj.weight"] @ (g / (1 + np.exp(-g)) * u)
        x = self.rmsnorm(x, w["model.norm.weight"])
        return w["lm_head.weight"] @ x

    def greedy(self, ids, n=NEW_TOKENS):
        """(first logits float64, n argmax tokens, min top-2 gap, min relative gap)."""
        cache = [([], []) for _ in range(self.cfg["num_hidden_layers"])]
        for t in ids:
            logits = self.step(t, cache)
        first = logits
        toks, min_gap, min_rel = [], math.inf, math.inf
        for i in range(n):
            order = np.argsort(-logits, kind="stable")
            gap = float(logits[order[0]] - logits[order[1]])
            span = float(logits.max() - logits.min())
            min_gap = min(min_gap, gap)
            min_rel = min(min_rel, gap / span if span > 0 else 0.0)
            toks.append(int(order[0]))
            if i + 1 < n:
                logits = self.step(toks[-1], cache)
        return first, toks, min_gap, min_rel


@torch.no_grad()
def torch_greedy(model, ids, n=NEW_TOKENS):
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    logits, past = out.logits[0, -1].to(torch.float32), out.past_key_values
    first, toks = logits.clone().numpy().astype(np.float64), []
    for i in range(n):
        toks.append(int(torch.argmax(logits)))
        if i + 1 < n:
            out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=past, use_cache=True)
            logits, past = out.logits[0, -1].to(torch.float32), out.past_key_values
    return first, toks


def load_transformers(fname, weights, rope_factors, cfg):
    """transformers' model from the GGUF file, checked weight by weight
    against ours, with its RoPE frequencies set from rope_freqs."""
    model = AutoModelForCausalLM.from_pretrained(OUT_DIR, gguf_file=fname, dtype=torch.float32)
    model.eval()
    sd = model.state_dict()
    for name, want in weights.items():
        got = sd[name].numpy()
        if got.shape != want.shape or not np.array_equal(got, want):
            raise SystemExit("tiny-gguf: %s: transformers loads %s differently" % (fname, name))
    rot = model.model.rotary_emb
    if getattr(rot, "attention_scaling", 1.0) != 1.0:
        raise SystemExit("tiny-gguf: %s: unexpected rotary attention scaling" % fname)
    d = cfg["head_dim"]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    rot.inv_freq.copy_(inv / torch.from_numpy(rope_factors))
    return model


# ---------------------------------------------------------------------------


def make_type(tname, cfg, tensors, rope_factors, tok_fields, encode, tiny_gold):
    qtype, ftype = TYPES[tname]
    fname = "tiny-llama-%s.gguf" % tname
    path = os.path.join(OUT_DIR, fname)
    write_gguf(path, cfg, tensors, qtype, ftype, rope_factors, tok_fields)

    weights, freqs, types = read_gguf(path, cfg)
    if not np.array_equal(freqs, rope_factors):
        raise SystemExit("tiny-gguf: %s: rope_freqs did not round-trip" % fname)
    ref = Reference(cfg, weights, freqs)
    hf = load_transformers(fname, weights, freqs, cfg)
    name = "tiny-gguf-" + tname

    prompts, logits_out, skipped = [], {}, []
    worst_hf = 0.0
    worst_tiny = None
    for text in PROMPTS:
        if len(prompts) == MAX_PROMPTS:
            break
        ids = encode(text)
        first, toks, gap, gap_rel = ref.greedy(ids)
        if not gap_rel > MIN_REL_GAP:
            skipped.append(text)
            continue
        span = float(first.max() - first.min())
        hf_first, hf_toks = torch_greedy(hf, ids)
        diff = float(np.max(np.abs(hf_first - first))) / span
        if hf_toks != toks or diff > CROSS_CHECK_REL:
            raise SystemExit("tiny-gguf: %s prompt %r: transformers (rope_freqs applied) disagrees: "
                             "tokens %s, logits %.3g of the range" % (fname, text[:40], hf_toks == toks, diff))
        worst_hf = max(worst_hf, diff)
        if tname == "f32" and text in tiny_gold:
            g = tiny_gold[text]
            tl = np.fromfile(os.path.join(GOLDENS, g["logits_file"]), dtype="<f4").astype(np.float64)
            d = float(np.max(np.abs(tl - first))) / span
            if g["ids"] != ids or g["greedy"] != toks or d > CROSS_CHECK_REL:
                raise SystemExit("tiny-gguf: %s prompt %r does not reproduce tiny-llama.json "
                                 "(ids %s, tokens %s, logits %.3g of the range)"
                                 % (fname, text[:40], g["ids"] == ids, g["greedy"] == toks, d))
            worst_tiny = max(worst_tiny or 0.0, d)
        i = len(prompts)
        lf = "%s-%d.f32" % (name, i)
        logits_out[lf] = first.astype("<f4")
        prompts.append({
            "text": text,
            "ids": ids,
            "greedy": toks,
            "logits_file": lf,
            "logit_min": f32(first.min()),
            "logit_max": f32(first.max()),
            "min_top2_gap": f32(gap),
            "min_top2_gap_rel": f32(gap_rel),
        })
    if len(prompts) < MIN_PROMPTS:
        raise SystemExit("tiny-gguf: %s: only %d prompts without near-ties" % (fname, len(prompts)))

    matrix_types = sorted(set(v for k, v in types.items() if weights[k].ndim == 2))
    doc = {
        "model": rel(path),
        "reference": "float64 numpy forward pass in hack/make-gguf-fixtures.py over the weights "
        "dequantized by gguf %s, rotary frequencies base^(-2i/d) / rope_freqs[i] "
        "(transformers %s loads the file but ignores rope_freqs)"
        % (importlib.metadata.version("gguf"), transformers.__version__),
        "tokenizer": "%s via tokenizers %s, add_special_tokens=True"
        % (rel(os.path.join(TINY_DIR, "tokenizer.json")), tokenizers.__version__),
        "dtype": "matrices %s, norms and rope_freqs F32, computed in float64" % "/".join(matrix_types),
        "vocab_size": cfg["vocab_size"],
        "eos_token_id": cfg["eos_token_id"],
        "rope_freqs": [f32(x) for x in freqs],
        "cross_check": {
            "transformers": "transformers %s, torch %s: the state dict it loads from the file equals "
            "these weights; float32 forward with inv_freq from rope_freqs gives the same greedy "
            "tokens, first logits within %.2e of the range"
            % (transformers.__version__, torch.__version__.split("+")[0], worst_hf),
        },
        "prompts": prompts,
    }
    if worst_tiny is not None:
        doc["cross_check"]["tiny-llama"] = (
            "the prompts shared with %s give the same ids and greedy tokens, first logits "
            "within %.2e of the range" % (rel(TINY_GOLDENS), worst_tiny))
    for old in glob.glob(os.path.join(GOLDENS, name + "-*.f32")):
        os.remove(old)
    for lf, arr in logits_out.items():
        arr.tofile(os.path.join(GOLDENS, lf))
    write_json(os.path.join(GOLDENS, name + ".json"), doc)
    print("%s: %d bytes, %d prompts%s; transformers within %.1e, tiny-llama within %s"
          % (rel(path), os.path.getsize(path), len(prompts),
             " (near-ties skipped: %s)" % ", ".join(repr(s[:20]) for s in skipped) if skipped else "",
             worst_hf, "%.1e" % worst_tiny if worst_tiny is not None else "-"))


def main(argv):
    wanted = argv[1:] or list(TYPES)
    for t in wanted:
        if t not in TYPES:
            raise SystemExit("usage: hack/make-gguf-fixtures.py [%s ...]" % "|".join(TYPES))
    for p in (os.path.join(TINY_DIR, "config.json"), SPBPE_GGUF, TINY_GOLDENS):
        if not os.path.isfile(p):
            raise SystemExit("tiny-gguf: %s missing (hack/make-tokenizer-fixtures.py, "
                             "hack/make-goldens.py tiny)" % rel(p))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    with open(os.path.join(TINY_DIR, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg["rope_scaling"].get("rope_type") != "llama3":
        raise SystemExit("tiny-gguf: the tiny model no longer uses llama3 rope scaling")
    tensors = read_hf_tensors()
    rope_factors = llama3_rope_factors(cfg)
    tok_fields = tokenizer_fields()
    tok = tokenizers.Tokenizer.from_file(os.path.join(TINY_DIR, "tokenizer.json"))

    def encode(text):
        return tok.encode(text, add_special_tokens=True).ids

    with open(TINY_GOLDENS, encoding="utf-8") as f:
        tiny_gold = {p["text"]: p for p in json.load(f)["prompts"]}
    os.makedirs(OUT_DIR, exist_ok=True)
    for t in wanted:
        make_type(t, cfg, tensors, rope_factors, tok_fields, encode, tiny_gold)


if __name__ == "__main__":
    main(sys.argv)
