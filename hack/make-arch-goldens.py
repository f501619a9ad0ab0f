#!/usr/bin/env python3
"""Builds a tiny random model of each non-Llama architecture loraplane loads,
its GGUF variant, a PEFT adapter for it, and reference outputs of all of them.

  tests/fixtures/tiny-<arch>/              the model as transformers saves it
                                           (bf16 model.safetensors, config.json
                                           in the hub's form) with a tiny
                                           byte-level BPE tokenizer of the
                                           family's shape and its chat template
  tests/fixtures/tiny-gguf/tiny-<arch>-bf16.gguf
                                           the same weights as llama.cpp's
                                           convert_hf_to_gguf.py writes them
                                           (--outtype bf16: matrices BF16,
                                           vectors F32) with the tokenizer in
                                           the GGUF metadata
  tests/fixtures/lora/tiny-<arch>/r8-all/  a PEFT LoRA adapter (rank 8, all
                                           seven target modules)
  tests/fixtures/goldens/tiny-<arch>.json, tiny-<arch>-<i>.f32
  tests/fixtures/goldens/tiny-<arch>-lora.json, tiny-<arch>-lora-<i>.f32
                                           prompt ids, 32 greedy tokens and
                                           the prompt's last-position logits
                                           from transformers (and peft) in
                                           float32 on the CPU

arch is qwen2 (Qwen2 / Qwen2.5: q/k/v biases, tied embeddings, GQA) or qwen3
(Qwen3 dense: RMSNorm over each head of q and k, head_dim 32 with hidden 64,
untied, GQA). The goldens have the layout of tiny-llama.json and of the
lora-*.json files (hack/README.md); the base goldens add "gguf" (the GGUF
variant, which holds exactly the same weights and must give the same
outputs) and, per prompt, "nfc_changes" (the text is not in Unicode NFC:
the HF tokenizer normalizes it, llama.cpp's GGUF tokenizer does not, so the
GGUF tokenizer's ids for that text differ).

Needs the reference venv with peft (hack/README.md). Deterministic: rerunning
gives byte-identical files.

usage: hack/make-arch-goldens.py [qwen2|qwen3 ...]   (no argument: both)
"""

import copy
import glob
import json
import os
import shutil
import sys
import unicodedata

sys.dont_write_bytecode = True

HACK = os.path.dirname(os.path.abspath(__file__))


from sibling import load_script  # noqa: E402


# make-goldens.py sets the offline / single-thread environment and has the
# greedy loop; make-lora-goldens.py makes and calibrates adapters;
# make-tokenizer-fixtures.py has the corpus and the real chat templates.
mg = load_script("make_goldens", "make-goldens.py")
mlg = load_script("make_lora_goldens", "make-lora-goldens.py")
mtf = load_script("make_tokenizer_fixtures", "make-tokenizer-fixtures.py")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = mg.ROOT
FIXTURES = mg.FIXTURES
GOLDENS = mg.GOLDENS
GGUF_DIR = os.path.join(FIXTURES, "tiny-gguf")
LORA_DIR = os.path.join(FIXTURES, "lora")

STD = 0.25  # projections, embeddings and biases, as tiny-llama
NORM_STD = 0.1  # RMSNorm weights (q_norm and k_norm too) are 1 + N(0, this)
SEEDS = range(2000, 4000)
MAX_DIR_BYTES = 1000 * 1000
BPE_VOCAB = 500  # trained tokens, before the added ones
VOCAB_MULTIPLE = 64  # embedding rows are padded like Qwen's (151936 > 151665)

# Qwen2's Split pattern (its tokenizer.json and llama.cpp's "qwen2" pre-tokenizer)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

ARCHS = {
    "qwen2": {
        "config": {
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "hidden_size": 64,
            "initializer_range": STD,
            "intermediate_size": 160,
            "max_position_embeddings": 256,
            "max_window_layers": 1,
            "model_type": "qwen2",
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            # shorter than the prompts, but off: Qwen2.5's configs carry a
            # window with use_sliding_window false, and it must not matter
            "sliding_window": 48,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
        },
        "template": mtf.QWEN25_TEMPLATE,
        # Qwen2.5's added tokens that matter here; all special
        "added": [(ENDOFTEXT, True), (IM_START, True), (IM_END, True)],
        "features": "GQA 4/2 heads of 16, biases on q/k/v, tied embeddings, rope_theta 1e6, "
        "a 48-token sliding_window with use_sliding_window false",
    },
    "qwen3": {
        "config": {
            "architectures": ["Qwen3ForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "head_dim": 32,
            "hidden_act": "silu",
            "hidden_size": 64,
            "initializer_range": STD,
            "intermediate_size": 128,
            "max_position_embeddings": 256,
            "max_window_layers": 2,
            "model_type": "qwen3",
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": False,
        },
        "template": mtf.QWEN3_TEMPLATE,
        # Qwen3 marks <think> and </think> as added but not special
        "added": [(ENDOFTEXT, True), (IM_START, True), (IM_END, True), ("<think>", False), ("</think>", False)],
        "features": "GQA 4/2 heads of 32 (q_proj out 128 with hidden 64), q_norm and k_norm, "
        "no biases, untied embeddings, rope_theta 1e6",
    },
}

PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, 3 people flew to the moon & back!",
    # decomposed accents: NFC composes them (the HF tokenizer's normalizer)
    "Cafe\u0301, nai\u0308ve re\u0301sume\u0301 \u2014 \u6771\u4eac \U0001f680",
    "<|im_start|>user\nWhat is LoRA?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time there was a little girl who lived in a village near the "
    "forest, and everyone called her Red Riding Hood.",
]
BATCH_EXTRA = [
    "water",
    "What would you write if you could find the right words for them?",
]
LORA_SPEC = ("r8-all", 8, 16, mlg.ALL7, {})
LORA_CANDIDATES = PROMPTS + BATCH_EXTRA + [
    "Where is the nearest train station?",
    "Please write a short poem about the sea.",
    "Good morning",
]


def rel(path):
    return os.path.relpath(path, ROOT)


def padded(n):
    return (n + VOCAB_MULTIPLE - 1) // VOCAB_MULTIPLE * VOCAB_MULTIPLE


# ---------------------------------------------------------------------------
# Tokenizer: a byte-level BPE laid out as Qwen's tokenizer.json (NFC
# normalizer, the Qwen2 Split then ByteLevel without its regex, ByteLevel
# decoder, no BOS), trained here on the spbpe corpus.


def trained_bpe():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = mtf.sp_corpus() + [unicodedata.normalize("NFC", p) for p in PROMPTS + BATCH_EXTRA]
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def write_tokenizer(out_dir, spec):
    tok = trained_bpe()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for text, special in spec["added"]:
        tok.add_tokens([AddedToken(text, special=special, normalized=False)])
    doc = json.loads(tok.to_str())
    # as Qwen's file has it (the decoders.ByteLevel constructor takes no options)
    doc["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    for a in doc["added_tokens"]:
        a["special"] = dict(spec["added"])[a["content"]]
    mtf.write_json(os.path.join(out_dir, "tokenizer.json"), doc, indent=2)
    ids = {a["content"]: a["id"] for a in doc["added_tokens"]}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                  "single_word", "special")}
                                 for a in doc["added_tokens"]},
        "bos_token": None,
        "chat_template": spec["template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 256,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    mtf.write_json(os.path.join(out_dir, "tokenizer_config.json"), config, indent=2)
    return Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json")), ids


# ---------------------------------------------------------------------------
# Model


def build(arch, seed, cfg_dict, out_dir, tok_files):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**copy.deepcopy(cfg_dict))
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * torch.randn(p.shape))
            else:
                p.copy_(STD * torch.randn(p.shape))
    save_model(model, cfg_dict, out_dir, tok_files)


def save_model(model, cfg_dict, out_dir, tok_files):
    """Saves model in bf16 into out_dir (made anew, keeping the tokenizer
    files tok_files), with cfg_dict as its config.json and no
    generation_config.json."""
    model = model.to(torch.bfloat16)
    keep = {f: open(f, "rb").read() for f in tok_files}
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f, data in keep.items():
        with open(f, "wb") as fh:
            fh.write(data)
    conf = dict(cfg_dict)
    conf["transformers_version"] = transformers.__version__
    mg.write_json(os.path.join(out_dir, "config.json"), conf)
    gen = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)
    for f in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, f), 0o644)


def check_saved(arch, out_dir, cfg_dict, model):
    files = sorted(os.listdir(out_dir))
    want = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    if files != want:
        raise SystemExit("tiny-%s: files %s, expected %s" % (arch, files, want))
    with safetensors.safe_open(os.path.join(out_dir, "model.safetensors"), "pt") as st:
        names = set(st.keys())
        for k in names:
            if st.get_slice(k).get_dtype() != "BF16":
                raise SystemExit("tiny-%s: %s is not BF16" % (arch, k))
    tied = cfg_dict["tie_word_embeddings"]
    if ("lm_head.weight" in names) == tied:
        raise SystemExit("tiny-%s: lm_head.weight %s" % (arch, "present although tied" if tied else "missing"))
    if arch == "qwen2" and "model.layers.0.self_attn.q_proj.bias" not in names:
        raise SystemExit("tiny-qwen2: no q_proj bias")
    if arch == "qwen3" and "model.layers.0.self_attn.q_norm.weight" not in names:
        raise SystemExit("tiny-qwen3: no q_norm")
    if any(t != "full_attention" for t in model.config.layer_types):
        raise SystemExit("tiny-%s: transformers made sliding layers: %s" % (arch, model.config.layer_types))
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out_dir, "*")))
    if total >= MAX_DIR_BYTES:
        raise SystemExit("tiny-%s: directory is %d bytes, over 1 MB" % (arch, total))


def write_goldens(name, doc, logits):
    """As make-goldens.py's, but leaves the -lora-* logits of name alone."""
    for old in glob.glob(os.path.join(GOLDENS, name + "-[0-9]*.f32")):
        os.remove(old)
    for fname, arr in logits.items():
        arr.tofile(os.path.join(GOLDENS, fname))
    mg.write_json(os.path.join(GOLDENS, name + ".json"), doc)


# ---------------------------------------------------------------------------
# GGUF, as convert_hf_to_gguf.py writes Qwen2Model / Qwen3Model: no Q/K
# permutation (llama.cpp runs both with NEOX rope, the HF layout), biases and
# q/k norms as F32 vectors, no output.weight when the embeddings are tied.

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf):
    if hf in TOP_NAMES:
        return TOP_NAMES[hf]
    parts = hf.split(".")
    return "blk.%s.%s" % (parts[2], LAYER_NAMES[".".join(parts[3:])])


def gguf_vocab(tok, vocab_size):
    """tokens, token types and merges as convert_hf_to_gguf.py's
    get_vocab_base / _set_vocab_gpt2 write them: added special tokens are
    CONTROL, other added tokens USER_DEFINED, rows past the tokenizer
    [PAD<i>] USER_DEFINED."""
    doc = json.loads(tok.to_str())
    added = {a["id"]: a for a in doc["added_tokens"]}
    rev = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in rev:
            tokens.append("[PAD%d]" % i)
            types.append(T.USER_DEFINED)
        elif i in added:
            tokens.append(rev[i])
            types.append(T.CONTROL if added[i]["special"] else T.USER_DEFINED)
        else:
            tokens.append(rev[i])
            types.append(T.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    return tokens, types, merges


def write_gguf(arch, path, model_dir, cfg, tok, ids, template):
    w = gguf.GGUFWriter(path, arch)
    w.add_type("model")
    w.add_name("tiny-%s" % arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = gguf_vocab(tok, cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(ids[IM_END])
    w.add_pad_token_id(ids[ENDOFTEXT])
    w.add_bos_token_id(ids[ENDOFTEXT])
    w.add_add_bos_token(False)
    w.add_chat_template(template)
    with safetensors.safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as st:
        for name in st.keys():
            data = st.get_tensor(name).to(torch.float32).numpy()
            t = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else gguf.GGMLQuantizationType.BF16
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.chmod(path, 0o644)


def check_gguf(arch, path, model):
    """Every tensor of the file equals the HF model's, bit for bit."""
    r = gguf.GGUFReader(path)
    sd = {gguf_name(k): v for k, v in model.state_dict().items()
          if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    seen = set()
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        want = sd[t.name].numpy()
        if data.shape != want.shape or not np.array_equal(data, want):
            raise SystemExit("tiny-%s: %s in the GGUF file differs from the HF weights" % (arch, t.name))
        seen.add(t.name)
    if seen != set(sd):
        raise SystemExit("tiny-%s: GGUF tensors %s differ from HF's %s" % (arch, sorted(seen ^ set(sd)), ""))


@torch.no_grad()
def cross_check_transformers_gguf(arch, fname, prompts):
    """transformers' own GGUF loader on the file: same greedy tokens, logits
    within 1e-4 of the range; or why it cannot load the file."""
    want_hd = ARCHS[arch]["config"].get("head_dim")
    got_hd = getattr(transformers.AutoConfig.from_pretrained(GGUF_DIR, gguf_file=fname), "head_dim", None)
    if want_hd and got_hd != want_hd:
        # its qwen3 GGUF key map has no attention.key_length
        return ("transformers %s cannot load it: it reads head_dim %s, not the file's "
                "attention.key_length %d; the file's tensors equal the HF model's (checked)"
                % (transformers.__version__, got_hd, want_hd))
    m = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=fname, dtype=torch.float32)
    m.eval()
    worst = 0.0
    for p in prompts:
        first, toks, _, _ = mg.greedy(m, p["ids"])
        want = np.fromfile(os.path.join(GOLDENS, p["logits_file"]), dtype="<f4")
        d = float(np.max(np.abs(first - want))) / (p["logit_max"] - p["logit_min"])
        if toks != p["greedy"] or d > 1e-4:
            raise SystemExit("tiny-%s: transformers on %s disagrees (tokens %s, logits %.3g of the range)"
                             % (arch, fname, toks == p["greedy"], d))
        worst = max(worst, d)
    return "transformers %s loads it: same greedy tokens, first logits within %.2e of the range" % (
        transformers.__version__, worst)


# ---------------------------------------------------------------------------


def make_arch(arch):
    spec = ARCHS[arch]
    out_dir = os.path.join(FIXTURES, "tiny-" + arch)
    os.makedirs(out_dir, exist_ok=True)
    tok, ids = write_tokenizer(out_dir, spec)
    tok_files = [os.path.join(out_dir, f) for f in ("tokenizer.json", "tokenizer_config.json")]
    cfg = dict(spec["config"])
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    cfg["vocab_size"] = padded(n_tok)
    cfg["bos_token_id"] = ids[ENDOFTEXT]
    cfg["eos_token_id"] = ids[IM_END]

    def encode(text):
        return tok.encode(text, add_special_tokens=True).ids

    rejected = 0
    for seed in SEEDS:
        build(arch, seed, cfg, out_dir, tok_files)
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        model.eval()
        check_saved(arch, out_dir, cfg, model)
        logits = {}
        try:
            prompts = mg.run_prompts(model, encode, PROMPTS, "tiny-" + arch, logits)
            batch = mg.batch_prompts(prompts, mg.run_prompts(model, encode, BATCH_EXTRA, "tiny-" + arch, None))
        except ValueError:
            rejected += 1
            continue
        break
    else:
        raise SystemExit("tiny-%s: no seed gave well-separated greedy steps" % arch)
    for p in prompts + batch:
        p["nfc_changes"] = unicodedata.normalize("NFC", p["text"]) != p["text"]
    # the real template, rendered by transformers, is what the C renderer
    # is checked against (tests/fixtures/chat/goldens.json)
    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    msgs = [{"role": "user", "content": "Hi"}]
    want = mtf.render_chat(spec["template"], msgs, True, None, IM_END)[0]
    if hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) != want:
        raise SystemExit("tiny-%s: apply_chat_template differs from make-tokenizer-fixtures.py's rendering" % arch)
    if hf_tok(PROMPTS[4])["input_ids"] != encode(PROMPTS[4]):
        raise SystemExit("tiny-%s: transformers' tokenizer and tokenizers disagree" % arch)

    gguf_name_ = "tiny-%s-bf16.gguf" % arch
    gguf_path = os.path.join(GGUF_DIR, gguf_name_)
    write_gguf(arch, gguf_path, out_dir, cfg, tok, ids, spec["template"])
    check_gguf(arch, gguf_path, model)

    name = "tiny-" + arch
    doc = {
        "model": rel(out_dir),
        "gguf": rel(gguf_path),
        "reference": mg.REFERENCE,
        "tokenizer": "%s via tokenizers %s, add_special_tokens=True"
        % (rel(os.path.join(out_dir, "tokenizer.json")), tokenizers.__version__),
        "dtype": "bf16 weights, computed in float32; the GGUF file holds the same bf16 matrices and "
        "f32 vectors",
        "features": spec["features"],
        "seed": seed,
        "init_std": STD,
        "vocab_size": cfg["vocab_size"],
        "tokenizer_size": n_tok,
        "eos_token_id": cfg["eos_token_id"],
        "prompts": prompts,
        "batch": mg.batch_entry(batch),
    }
    write_goldens(name, doc, logits)
    doc["gguf_cross_check"] = cross_check_transformers_gguf(arch, gguf_name_, prompts)
    write_goldens(name, doc, logits)
    print("tiny-%s: seed %d (%d earlier seeds had near-ties), vocab %d (tokenizer %d), %d + %d bytes; %s"
          % (arch, seed, rejected, cfg["vocab_size"], n_tok,
             sum(os.path.getsize(p) for p in glob.glob(os.path.join(out_dir, "*"))),
             os.path.getsize(gguf_path), doc["gguf_cross_check"]))
    return model, encode, out_dir


def make_lora(arch, model, encode, model_dir):
    key = "tiny-" + arch
    base = mlg.Base(key, model, encode, rel(model_dir),
                    "%s via tokenizers %s, add_special_tokens=True"
                    % (rel(os.path.join(model_dir, "tokenizer.json")), tokenizers.__version__),
                    "bf16 weights, computed in float32; adapter float32",
                    rel(model_dir), LORA_CANDIDATES, 4)
    name = LORA_SPEC[0]
    out_dir = os.path.join(LORA_DIR, key, name)
    first_seed = {"qwen2": 9000, "qwen3": 9500}[arch]
    for seed in range(first_seed, first_seed + mlg.SEED_TRIES):
        got = mlg.try_adapter(base, LORA_SPEC, seed, out_dir)
        if got is not None:
            break
    else:
        raise SystemExit("%s/%s: no seed gave enough well-separated prompts the adapter changes" % (key, name))
    entries, logits_in, peft_model = got
    logits = {}
    for i, e in enumerate(entries):
        fname = "%s-lora-%d.f32" % (key, i)
        logits[fname] = logits_in[e["logits_file"]]
        e["logits_file"] = fname
    modules, layers = mlg.module_summary(peft_model)
    with open(os.path.join(out_dir, "adapter_config.json"), encoding="utf-8") as f:
        acfg = json.load(f)
    changed = sum(e["first_change"] is not None and e["first_change"] < mlg.CHANGED_WITHIN for e in entries)
    doc = {
        "model": rel(model_dir),
        "gguf": rel(os.path.join(GGUF_DIR, "tiny-%s-bf16.gguf" % arch)),
        "adapter": rel(out_dir),
        "reference": mlg.REFERENCE,
        "tokenizer": base.tokenizer,
        "dtype": base.dtype,
        "vocab_size": base.vocab_size,
        "eos_token_id": base.eos_token_id,
        "lora": {
            "r": acfg["r"],
            "lora_alpha": acfg["lora_alpha"],
            "target_modules": acfg["target_modules"],
            "layers": layers,
            "modules": modules,
            "seed": seed,
        },
        "changed_prompts": "%d of %d prompts: greedy tokens differ from base_greedy within the first %d"
        % (changed, len(entries), mlg.CHANGED_WITHIN),
        "prompts": entries,
    }
    for old in glob.glob(os.path.join(GOLDENS, key + "-lora-*.f32")):
        os.remove(old)
    for fname, arr in logits.items():
        arr.tofile(os.path.join(GOLDENS, fname))
    mg.write_json(os.path.join(GOLDENS, key + "-lora.json"), doc)
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(out_dir, "*")))
    print("%s/%s: seed %d, %d prompts (%d changed by the adapter), %d bytes"
          % (key, name, seed, len(entries), changed, size))


def main(argv):
    wanted = argv[1:] or list(ARCHS)
    for a in wanted:
        if a not in ARCHS:
            raise SystemExit("usage: hack/make-arch-goldens.py [%s ...]" % "|".join(ARCHS))
    mg.setup_torch()
    for a in wanted:
        model, encode, model_dir = make_arch(a)
        make_lora(a, model, encode, model_dir)


if __name__ == "__main__":
    main(sys.argv)
