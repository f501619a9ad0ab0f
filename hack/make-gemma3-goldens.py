#!/usr/bin/env python3
"""Builds a tiny random Gemma 3 (text) model, its GGUF variant, a PEFT
adapter for it, and reference outputs of all of them.

  tests/fixtures/tiny-gemma3/              the model as transformers saves it
                                           (bf16 model.safetensors, config.json
                                           in the hub's form: rope_theta,
                                           rope_local_base_freq, layer_types)
                                           with a tiny SentencePiece-style BPE
                                           tokenizer of Gemma's shape (no
                                           dummy prefix, byte fallback,
                                           <bos> first, <start_of_turn> and
                                           <end_of_turn> special)
  tests/fixtures/tiny-gguf/tiny-gemma3-bf16.gguf
                                           the same weights as llama.cpp's
                                           convert_hf_to_gguf.py writes
                                           Gemma3Model (matrices BF16, norm
                                           weights F32 holding 1 + w), the
                                           tokenizer as a "llama" vocabulary
                                           with scores, add_space_prefix false;
                                           the layer pattern as a boolean
                                           array and attention.scale (llama.cpp
                                           fixes 6 and 1 / sqrt(key_length))
  tests/fixtures/lora/tiny-gemma3/r8-all/  a PEFT LoRA adapter (rank 8, all
                                           seven target modules)
  tests/fixtures/goldens/tiny-gemma3.json, tiny-gemma3-<i>.f32
  tests/fixtures/goldens/tiny-gemma3-lora.json, tiny-gemma3-lora-<i>.f32
                                           prompt ids, 32 greedy tokens and
                                           the prompt's last-position logits
                                           from transformers (and peft) in
                                           float32 on the CPU

The model exercises what Gemma 3 adds: (1 + w) RMSNorm, norms after the
attention and after the MLP, q/k norm, GeGLU (gelu_pytorch_tanh),
embeddings scaled by sqrt(hidden), query_pre_attn_scalar (24, not
head_dim), local layers (window 16, shorter than the prompts) with RoPE
base 1e4 between a global layer with base 1e6, GQA 4/2 heads of 32 with
hidden 64, tied embeddings. The goldens have the layout of
make-arch-goldens.py's (hack/README.md).

Needs the reference venv with peft (hack/README.md). Deterministic: rerunning
gives byte-identical files.

usage: hack/make-gemma3-goldens.py
"""

import copy
import glob
import json
import os
import sys

sys.dont_write_bytecode = True

HACK = os.path.dirname(os.path.abspath(__file__))


from sibling import load_script  # noqa: E402


# make-arch-goldens.py has the goldens layout and the adapter step (it
# loads make-goldens.py, make-lora-goldens.py, make-tokenizer-fixtures.py)
mag = load_script("make_arch_goldens", "make-arch-goldens.py")
mg, mlg, mtf = mag.mg, mag.mlg, mag.mtf

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ARCH = "gemma3"
NAME = "tiny-gemma3"
FIXTURES, GOLDENS = mag.FIXTURES, mag.GOLDENS
OUT_DIR = os.path.join(FIXTURES, NAME)
GGUF_PATH = os.path.join(mag.GGUF_DIR, NAME + "-bf16.gguf")
STD = 0.25  # projections, as the other tiny models
# embeddings: STD after the sqrt(hidden) scale (with STD itself the scaled
# embedding swamps the residual stream and every prompt repeats itself)
EMBED_STD = STD / 8
NORM_STD = 0.1  # Gemma's norm weights w (the scale is 1 + w) are N(0, this)
WINDOW = 16
VOCAB = 512
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
BYTES = ["<0x%02X>" % b for b in range(256)]

CONFIG = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "head_dim": 32,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 64,
    "initializer_range": STD,
    "intermediate_size": 128,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "max_position_embeddings": 256,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 24,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000.0,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": WINDOW,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "use_cache": True,
}
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "In 1969, 3 people flew to the moon & back!",
    "Caf\u00e9, na\u00efve r\u00e9sum\u00e9 \u2014 \u6771\u4eac \U0001f680",
    "<start_of_turn>user\nWhat is LoRA?<end_of_turn>\n<start_of_turn>model\n",
    "Once upon a time there was a little girl who lived in a village near the "
    "forest, and everyone called her Red Riding Hood.",
]
BATCH_EXTRA = mag.BATCH_EXTRA
# Gemma 3's chat template (the instruction-tuned models' tokenizer_config.json)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n")
# conversations rendered by transformers' apply_chat_template for the C
# renderer to match: (messages, add_generation_prompt)
CHATS = [
    ([{"role": "user", "content": "Hi"}], True),
    ([{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "  What is LoRA?\n"},
      {"role": "assistant", "content": "A low-rank adapter. "}, {"role": "user", "content": "And QLoRA?"}], True),
    ([{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there"}], False),
    ([{"role": "system", "content": "Only a system prompt"}], True),
    ([{"role": "user", "content": "caf\u00e9 \U0001f680"}, {"role": "assistant", "content": "ok"},
      {"role": "user", "content": "\tbye\t"}], True),
]
LORA_CANDIDATES = PROMPTS + BATCH_EXTRA + [
    "Where is the nearest train station?",
    "Please write a short poem about the sea.",
    "Good morning",
]


# ---------------------------------------------------------------------------
# Tokenizer: Gemma's tokenizer.json layout (transformers' GemmaConverter:
# normalizer Replace " " -> U+2581, pre-tokenizer Split(" ",
# merged_with_previous), BPE with byte fallback, decoder Replace, ByteFallback,
# Fuse; <bos> prepended), trained here on the spbpe corpus.


def write_tokenizer():
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(BYTES), special_tokens=SPECIALS, limit_alphabet=64,
                                  show_progress=False)
    trainer_tok.train_from_iterator(mtf.sp_corpus() + PROMPTS + BATCH_EXTRA, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {}
    for t in SPECIALS + BYTES:
        vocab[t] = len(vocab)
    for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    doc = json.loads(tok.to_str())
    mtf.write_json(os.path.join(OUT_DIR, "tokenizer.json"), doc, indent=2)
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                  "single_word", "special")}
                                 for a in doc["added_tokens"]},
        "bos_token": "<bos>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<eos>",
        "model_max_length": 256,
        "pad_token": "<pad>",
        "spaces_between_special_tokens": False,
        "tokenizer_class": "GemmaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
        "chat_template": GEMMA3_TEMPLATE,
    }
    mtf.write_json(os.path.join(OUT_DIR, "tokenizer_config.json"), config, indent=2)
    return Tokenizer.from_file(os.path.join(OUT_DIR, "tokenizer.json")), vocab, merges


# ---------------------------------------------------------------------------
# Model


def build(seed, cfg_dict, tok_files):
    torch.manual_seed(seed)
    cfg = transformers.AutoConfig.for_model(**copy.deepcopy(cfg_dict))
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            std = NORM_STD if pname.endswith("norm.weight") else EMBED_STD if "embed" in pname else STD
            p.copy_(std * torch.randn(p.shape))
    mag.save_model(model, cfg_dict, OUT_DIR, tok_files)


def check_saved(model):
    files = sorted(os.listdir(OUT_DIR))
    want = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    if files != want:
        raise SystemExit("%s: files %s, expected %s" % (NAME, files, want))
    with safetensors.safe_open(os.path.join(OUT_DIR, "model.safetensors"), "pt") as st:
        names = set(st.keys())
    for n in ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.post_attention_layernorm.weight",
              "model.layers.0.pre_feedforward_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight"):
        if n not in names:
            raise SystemExit("%s: %s missing" % (NAME, n))
    if "lm_head.weight" in names:
        raise SystemExit("%s: lm_head.weight present although tied" % NAME)
    c = model.config
    if list(c.layer_types) != CONFIG["layer_types"] or c.sliding_window != WINDOW:
        raise SystemExit("%s: transformers reads layers %s, window %s" % (NAME, c.layer_types, c.sliding_window))
    rp = c.rope_parameters
    if rp["sliding_attention"]["rope_theta"] != 1e4 or rp["full_attention"]["rope_theta"] != 1e6:
        raise SystemExit("%s: transformers reads rope %s" % (NAME, rp))
    total = sum(os.path.getsize(p) for p in glob.glob(os.path.join(OUT_DIR, "*")))
    if total >= mag.MAX_DIR_BYTES:
        raise SystemExit("%s: directory is %d bytes, over 1 MB" % (NAME, total))


# ---------------------------------------------------------------------------
# GGUF, as convert_hf_to_gguf.py writes Gemma3Model: no Q/K permutation,
# norm weights + 1 as F32, the embeddings as token_embd (tied: no output).

LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def gguf_name(hf):
    if hf in TOP_NAMES:
        return TOP_NAMES[hf]
    parts = hf.split(".")
    return "blk.%s.%s" % (parts[2], LAYER_NAMES[".".join(parts[3:])])


def write_gguf(cfg, vocab, merges):
    w = gguf.GGUFWriter(GGUF_PATH, ARCH)
    w.add_type("model")
    w.add_name(NAME)
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
    w.add_sliding_window(cfg["sliding_window"])
    # not llama.cpp's fixed pattern of 6: the layers as an array (true: sliding)
    w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
    # llama.cpp fixes 1 / sqrt(key_length); the query_pre_attn_scalar here differs
    w.add_attention_scale(cfg["query_pre_attn_scalar"] ** -0.5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    # a token made by merge r scores -r: earlier merges win, as in
    # SentencePiece where the score orders the pieces
    scores = [0.0] * len(tokens)
    for r, (a, b) in enumerate(merges):
        scores[vocab[a + b]] = -float(r + 1)
    T = gguf.TokenType
    types = [T.UNKNOWN if t == "<unk>" else T.CONTROL if t in SPECIALS else
             T.BYTE if t.startswith("<0x") and len(t) == 6 else T.NORMAL for t in tokens]
    tokens += ["<unused%d>" % i for i in range(cfg["vocab_size"] - len(tokens))]
    scores += [0.0] * (len(tokens) - len(scores))
    types += [T.USER_DEFINED] * (len(tokens) - len(types))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(vocab["<bos>"])
    w.add_eos_token_id(vocab["<eos>"])
    w.add_unk_token_id(vocab["<unk>"])
    w.add_pad_token_id(vocab["<pad>"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(GEMMA3_TEMPLATE)
    with safetensors.safe_open(os.path.join(OUT_DIR, "model.safetensors"), "pt") as st:
        for name in st.keys():
            data = st.get_tensor(name).to(torch.float32).numpy()
            if data.ndim == 1:
                data = data + np.float32(1.0)  # Gemma's norm_shift
                t = gguf.GGMLQuantizationType.F32
            else:
                t = gguf.GGMLQuantizationType.BF16
            w.add_tensor(gguf_name(name), gguf.quants.quantize(data, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.chmod(GGUF_PATH, 0o644)


# ---------------------------------------------------------------------------


def make_model():
    os.makedirs(OUT_DIR, exist_ok=True)
    tok, vocab, merges = write_tokenizer()
    tok_files = [os.path.join(OUT_DIR, f) for f in ("tokenizer.json", "tokenizer_config.json")]
    cfg = dict(CONFIG)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    cfg["vocab_size"] = mag.padded(n_tok)
    cfg["bos_token_id"] = vocab["<bos>"]
    cfg["eos_token_id"] = vocab["<eos>"]

    def encode(text):
        return tok.encode(text, add_special_tokens=True).ids

    rejected = 0
    for seed in mag.SEEDS:
        build(seed, cfg, tok_files)
        model = AutoModelForCausalLM.from_pretrained(OUT_DIR, dtype=torch.float32)
        model.eval()
        check_saved(model)
        logits = {}
        try:
            prompts = mg.run_prompts(model, encode, PROMPTS, NAME, logits)
            batch = mg.batch_prompts(prompts, mg.run_prompts(model, encode, BATCH_EXTRA, NAME, None))
        except ValueError:
            rejected += 1
            continue
        break
    else:
        raise SystemExit("%s: no seed gave well-separated greedy steps" % NAME)
    for p in prompts + batch:
        p["nfc_changes"] = False
    longer = sum(len(p["ids"]) > WINDOW for p in prompts)
    if longer < 3:
        raise SystemExit("%s: only %d prompts are longer than the window" % (NAME, longer))
    hf_tok = transformers.AutoTokenizer.from_pretrained(OUT_DIR)
    for text in PROMPTS:
        if hf_tok(text)["input_ids"] != encode(text):
            raise SystemExit("%s: transformers' tokenizer and tokenizers disagree on %r" % (NAME, text))
    chats = [{"messages": msgs, "add_generation_prompt": gen,
              "text": hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)} for msgs, gen in CHATS]
    try:
        hf_tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False)
        raise SystemExit("%s: the template accepted two user turns in a row" % NAME)
    except Exception as e:  # jinja2's TemplateError from raise_exception
        if isinstance(e, SystemExit):
            raise
    write_gguf(cfg, vocab, merges)
    doc = {
        "model": mag.rel(OUT_DIR),
        "gguf": mag.rel(GGUF_PATH),
        "reference": mg.REFERENCE,
        "tokenizer": "%s via tokenizers %s, add_special_tokens=True"
        % (mag.rel(os.path.join(OUT_DIR, "tokenizer.json")), tokenizers.__version__),
        "dtype": "bf16 weights, computed in float32; the GGUF file holds the same bf16 matrices and "
        "f32 norm weights plus one",
        "features": "Gemma 3: (1 + w) RMSNorm, post-attention and post-feed-forward norms, q/k norm, "
        "GeGLU, embeddings scaled by sqrt(64), query_pre_attn_scalar 24, layers sliding (16), full, "
        "sliding with rope bases 1e4, 1e6, 1e4, GQA 4/2 heads of 32, tied embeddings",
        "sliding_window": WINDOW,
        "seed": seed,
        "init_std": STD,
        "vocab_size": cfg["vocab_size"],
        "tokenizer_size": n_tok,
        "eos_token_id": cfg["eos_token_id"],
        "prompts": prompts,
        "batch": mg.batch_entry(batch),
        "chat": chats,
    }
    mag.write_goldens(NAME, doc, logits)
    print("%s: seed %d (%d earlier seeds had near-ties), vocab %d (tokenizer %d), %d + %d bytes"
          % (NAME, seed, rejected, cfg["vocab_size"], n_tok,
             sum(os.path.getsize(p) for p in glob.glob(os.path.join(OUT_DIR, "*"))),
             os.path.getsize(GGUF_PATH)))
    return model, encode


def make_lora(model, encode):
    base = mlg.Base(NAME, model, encode, mag.rel(OUT_DIR),
                    "%s via tokenizers %s, add_special_tokens=True"
                    % (mag.rel(os.path.join(OUT_DIR, "tokenizer.json")), tokenizers.__version__),
                    "bf16 weights, computed in float32; adapter float32",
                    mag.rel(OUT_DIR), LORA_CANDIDATES, 4)
    name = mag.LORA_SPEC[0]
    out_dir = os.path.join(mag.LORA_DIR, NAME, name)
    for seed in range(9700, 9700 + mlg.SEED_TRIES):
        got = mlg.try_adapter(base, mag.LORA_SPEC, seed, out_dir)
        if got is not None:
            break
    else:
        raise SystemExit("%s/%s: no seed gave enough well-separated prompts the adapter changes" % (NAME, name))
    entries, logits_in, peft_model = got
    logits = {}
    for i, e in enumerate(entries):
        fname = "%s-lora-%d.f32" % (NAME, i)
        logits[fname] = logits_in[e["logits_file"]]
        e["logits_file"] = fname
    modules, layers = mlg.module_summary(peft_model)
    with open(os.path.join(out_dir, "adapter_config.json"), encoding="utf-8") as f:
        acfg = json.load(f)
    changed = sum(e["first_change"] is not None and e["first_change"] < mlg.CHANGED_WITHIN for e in entries)
    doc = {
        "model": mag.rel(OUT_DIR),
        "gguf": mag.rel(GGUF_PATH),
        "adapter": mag.rel(out_dir),
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
    lora_name = NAME + "-lora"
    for old in glob.glob(os.path.join(GOLDENS, lora_name + "-[0-9]*.f32")):
        os.remove(old)
    for fname, arr in logits.items():
        arr.tofile(os.path.join(GOLDENS, fname))
    mg.write_json(os.path.join(GOLDENS, lora_name + ".json"), doc)
    print("%s: seed %d, %d prompts" % (lora_name, seed, len(entries)))


def main():
    mg.setup_torch()
    model, encode = make_model()
    make_lora(model, encode)


if __name__ == "__main__":
    main()
