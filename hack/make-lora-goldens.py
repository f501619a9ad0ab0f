#!/usr/bin/env python3
"""Builds the LoRA adapter fixtures with the real `peft` library, their
converted variants, and the reference outputs ("goldens") of the base models
with each adapter applied.

  tests/fixtures/lora/tiny/<name>/        PEFT adapters for tests/fixtures/tiny-llama
  tests/fixtures/lora/smollm2/<name>/     PEFT adapters for SmolLM2-135M-Instruct
  tests/fixtures/lora/<base>/<name>-bin/, <name>-trtllm/, <name>.nemo
                                          the same adapters converted by
                                          hack/convert-lora.py
  tests/fixtures/goldens/lora-<base>-<name>.json, lora-<base>-<name>-<i>.f32
                                          prompt ids, 32 greedy tokens with the
                                          adapter and without it, and the
                                          prompt's last-position logits, from
                                          transformers + peft in float32
  tests/fixtures/goldens/lora-tiny-mixed.json
                                          24 requests over 6 tiny adapters and
                                          the bare model, each decoded alone

Each adapter is made by LoraConfig + get_peft_model + save_pretrained
(safetensors, float32), with lora_A and lora_B overwritten by seeded random
normal values (PEFT would start B at zero, i.e. a no-op): A ~ N(0, 1/in), B
normal, scaled per module first so that scale * B @ A has DELTA_RATIO times the
Frobenius norm of the base weight, then (three rounds) so that on the longest
candidate prompt each module's LoRA output has DELTA_RATIO times the norm of
its base output. The goldens are computed by PeftModel.from_pretrained over the saved directory,
so they are what the files on disk do. Prompts are taken in order from a
candidate list until enough of them have no near-tie (top-2 logit gap above
1e-3 of the logit range at all 32 steps) both with and without the adapter;
an adapter seed is accepted only when, on all but at most one of its prompts,
the adapter changes a greedy token within the first 16. Every converted variant is read back
(by readers written here, separately from the converter) and checked: its
weight changes must equal PEFT's, and the base model with them merged in must
reproduce the golden tokens.

Needs the reference venv with peft (hack/README.md) and, for smollm2, the
GGUF model (hack/deps.sh). Deterministic: rerunning gives byte-identical
files.

usage: hack/make-lora-goldens.py [tiny|smollm2 ...]   (no argument: both)
"""

import copy
import io
import json
import math
import os
import shutil
import sys
import tarfile

sys.dont_write_bytecode = True

HACK = os.path.dirname(os.path.abspath(__file__))


from sibling import load_script  # noqa: E402


# make-goldens.py sets the offline / single-thread environment on import and
# provides the greedy loop, so these goldens are made exactly like the base
# model's.
mg = load_script("make_goldens", "make-goldens.py")
cl = load_script("convert_lora", "convert-lora.py")

import numpy as np  # noqa: E402
import peft  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = mg.ROOT
LORA_DIR = os.path.join(mg.FIXTURES, "lora")
REFERENCE = "transformers %s, peft %s, torch %s" % (
    transformers.__version__,
    peft.__version__,
    torch.__version__.split("+")[0],
)

DELTA_RATIO = 0.2  # |LoRA output| / |base output| of every adapted module
CALIBRATION_ROUNDS = 3
CHANGED_WITHIN = 16  # an adapter "changes" a prompt: a token differs this early
SEED_TRIES = 20
MAX_FIXTURE_BYTES = 8 * 1000 * 1000
MAX_SMOL_ADAPTER_BYTES = 4 * 1000 * 1000

Q, K, V, O = "q_proj", "k_proj", "v_proj", "o_proj"
GATE, UP, DOWN = "gate_proj", "up_proj", "down_proj"
ALL7 = [Q, K, V, O, GATE, UP, DOWN]

# name, r, lora_alpha, target modules, extra LoraConfig arguments
TINY_ADAPTERS = [
    ("r4-qv", 4, 8, [Q, V], {}),
    ("r8-all", 8, 16, ALL7, {}),
    ("r16-attn", 16, 16, [Q, K, V, O], {}),
    ("r64-mlp", 64, 32, [GATE, UP, DOWN], {}),
    ("r8-rslora", 8, 16, ALL7, {"use_rslora": True}),
    ("r8-pattern", 8, 16, ALL7, {"rank_pattern": {Q: 4, DOWN: 16}, "alpha_pattern": {K: 32}}),
    ("r4-layers", 4, 8, [Q, V, DOWN], {"layers_to_transform": [1]}),
]
# Kept small (all three under 4 MB): r8-od and r16-k adapt a spread of layers
# only (layers_to_transform), r4-qv adapts all 30.
SMOL_ADAPTERS = [
    ("r4-qv", 4, 8, [Q, V], {}),
    ("r8-od", 8, 16, [O, DOWN], {"layers_to_transform": list(range(0, 30, 5))}),
    ("r16-k", 16, 32, [K], {"layers_to_transform": list(range(1, 30, 4))}),
]
CONVERSIONS = {
    ("tiny", "r8-all"): ["bin", "trtllm", "nemo"],
    ("tiny", "r16-attn"): ["trtllm", "nemo"],
    ("tiny", "r8-rslora"): ["bin"],
    ("smollm2", "r4-qv"): ["bin", "trtllm"],
}

TINY_CANDIDATES = mg.TINY_PROMPTS + mg.TINY_BATCH_EXTRA + [
    "Where is the nearest train station?",
    "Please write a short poem about the sea.",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells for sure.",
    "Good morning",
]
SMOL_CANDIDATES = mg.SMOL_PROMPTS + mg.SMOL_BATCH_EXTRA

MIXED_ADAPTERS = ["r4-qv", "r8-all", "r16-attn", "r64-mlp", "r8-pattern", "r4-layers"]
MIXED_REQUESTS = 24
# 1 to 64 tokens with the tiny tokenizer (BOS included).
MIXED_TEXTS = [
    "",
    "Hi",
    "Hello",
    "Good morning",
    "The cat sat on the mat.",
    "1 2 3 4 5 6 7 8 9 10",
    "Please write a short poem about the sea.",
    "def add(a, b):\n    return a + b",
    "In 1969, 3 people flew to the moon & back!",
    "Translate to French: I would like a cup of coffee, please.",
    "She sells sea shells by the sea shore, and the shells she sells are sea shells for sure.",
    "A long time ago, in a galaxy far, far away, there lived a young farmer who dreamed of the stars.",
    "Once upon a time there was a little girl who lived in a village near the forest, and everyone "
    "called her Red Riding Hood.",
    "water",
    "Where is the nearest train station?",
    "The quick brown fox jumps over the lazy dog.",
    "Rain, rain, go away; come again another day.",
    "Yes!",
]


def rel(path):
    return os.path.relpath(path, ROOT)


# ---------------------------------------------------------------------------
# Base models


class Base:
    """A base model in float32 with what its goldens need."""

    def __init__(self, key, model, encode, model_path, tokenizer, dtype, name_or_path, candidates, n_prompts):
        self.key, self.model, self.encode = key, model, encode
        self.model_path, self.tokenizer, self.dtype = model_path, tokenizer, dtype
        self.name_or_path, self.candidates, self.n_prompts = name_or_path, candidates, n_prompts
        c = model.config
        self.vocab_size = int(c.vocab_size)
        self.eos_token_id = int(c.eos_token_id)
        heads = c.num_attention_heads
        self.shape = {
            "layers": c.num_hidden_layers,
            "hidden": c.hidden_size,
            "ffn": c.intermediate_size,
            "heads": heads,
            "kv_heads": c.num_key_value_heads or heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
        }
        self.cache = {}

    def greedy(self, ids):
        key = tuple(ids)
        if key not in self.cache:
            self.cache[key] = mg.greedy(self.model, ids)
        return self.cache[key]


def tiny_base():
    model = AutoModelForCausalLM.from_pretrained(mg.TINY_DIR, dtype=torch.float32)
    model.eval()
    tok_path = os.path.join(mg.TINY_DIR, "tokenizer.json")
    tok = tokenizers.Tokenizer.from_file(tok_path)

    def encode(text):
        return tok.encode(text, add_special_tokens=True).ids

    return Base(
        "tiny", model, encode, rel(mg.TINY_DIR),
        "%s via tokenizers %s, add_special_tokens=True" % (rel(tok_path), tokenizers.__version__),
        "bf16 weights, computed in float32; adapter float32",
        "tests/fixtures/tiny-llama", TINY_CANDIDATES, 4,
    )


def smol_base():
    gguf_path = os.path.join(mg.SMOL_GGUF_DIR, mg.SMOL_GGUF)
    if not os.path.isfile(gguf_path):
        raise SystemExit("smollm2: %s missing; run hack/deps.sh" % rel(gguf_path))
    if not os.path.isfile(mg.SMOL_TOKENIZER):
        raise SystemExit("smollm2: %s missing; run hack/make-tokenizer-fixtures.py" % rel(mg.SMOL_TOKENIZER))
    model = AutoModelForCausalLM.from_pretrained(mg.SMOL_GGUF_DIR, gguf_file=mg.SMOL_GGUF, dtype=torch.float32)
    model.eval()
    tok = tokenizers.Tokenizer.from_file(mg.SMOL_TOKENIZER)

    def encode(text):
        return tok.encode(text, add_special_tokens=True).ids

    return Base(
        "smollm2", model, encode, rel(gguf_path),
        "%s via tokenizers %s, add_special_tokens=True" % (rel(mg.SMOL_TOKENIZER), tokenizers.__version__),
        "GGUF weights dequantized to float32 by transformers, computed in float32; adapter float32",
        "HuggingFaceTB/SmolLM2-135M-Instruct", SMOL_CANDIDATES, 3,
    )


# ---------------------------------------------------------------------------
# Adapters


def lora_layers(model):
    """(layer index, HF module name, LoraLayer) for every adapted module."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            out.append((layer, parts[-1], name, mod))
    return out


@torch.no_grad()
def init_weights(model, seed, ratio):
    """Seeded A ~ N(0, 1/in) and B with |scale * B @ A|_F = ratio * |W|_F."""
    g = torch.Generator().manual_seed(seed)
    for _, _, _, mod in lora_layers(model):
        a_w, b_w = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        w = mod.base_layer.weight.to(torch.float32)
        scale = mod.scaling["default"]
        a = torch.randn(a_w.shape, generator=g) / math.sqrt(a_w.shape[1])
        b = torch.randn(b_w.shape, generator=g)
        b *= ratio * w.norm() / (scale * (b @ a)).norm()
        a_w.copy_(a)
        b_w.copy_(b)


def save_adapter(peft_model, base, out_dir):
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    # PEFT's model card is boilerplate; the fixture is the adapter.
    readme = os.path.join(out_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    cpath = os.path.join(out_dir, "adapter_config.json")
    with open(cpath, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = base.name_or_path
    # PEFT writes target_modules from a set, in hash order.
    cfg["target_modules"] = [m for m in ALL7 if m in cfg["target_modules"]]
    with open(cpath, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    for f in os.listdir(out_dir):
        os.chmod(os.path.join(out_dir, f), 0o644)


def load_adapter(base, path):
    model = PeftModel.from_pretrained(copy.deepcopy(base.model), path)
    model.eval()
    return model


@torch.no_grad()
def output_delta_ratios(model, ids):
    """{module name: |LoRA output| / |base layer output|} of every adapted
    module over the prompt's forward pass."""
    seen, hooks = {}, []
    for _, _, name, mod in lora_layers(model):
        scaling = mod.scaling["default"]

        def base_hook(m, inp, out, name=name):
            seen.setdefault(name, {})["base"] = float(out.norm())

        def lora_hook(m, inp, out, name=name, scaling=scaling):
            seen.setdefault(name, {})["lora"] = float(out.norm()) * scaling

        hooks.append(mod.base_layer.register_forward_hook(base_hook))
        hooks.append(mod.lora_B["default"].register_forward_hook(lora_hook))
    try:
        model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return {k: v["lora"] / v["base"] for k, v in seen.items()}


@torch.no_grad()
def calibrate(model, ids, ratio):
    """Rescales every B so that the module's LoRA output is ratio times its
    base output on the prompt; a few rounds, since adapting earlier modules
    changes the inputs of later ones."""
    for _ in range(CALIBRATION_ROUNDS):
        got = output_delta_ratios(model, ids)
        for _, _, name, mod in lora_layers(model):
            mod.lora_B["default"].weight.mul_(ratio / got[name])


def module_summary(model):
    """Per HF module: rank, alpha, scale (equal across layers here)."""
    out, layers = {}, set()
    for layer, module, _, mod in lora_layers(model):
        layers.add(layer)
        r = mod.r["default"]
        info = {"r": r, "lora_alpha": mod.lora_alpha["default"], "scale": mg.f32(mod.scaling["default"])}
        if out.setdefault(module, info) != info:
            raise SystemExit("%s: rank or scale differs between layers" % module)
    return {m: out[m] for m in ALL7 if m in out}, sorted(layers)


def try_adapter(base, spec, seed, out_dir):
    """Builds and saves the adapter with seed, then picks its prompts.
    Returns (prompt entries, logits, model) or None when the seed fails."""
    name, r, alpha, targets, extra = spec
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", **copy.deepcopy(extra))
    pm = get_peft_model(copy.deepcopy(base.model), config)
    init_weights(pm, seed, DELTA_RATIO)
    calibrate(pm, base.encode(max(base.candidates, key=len)), DELTA_RATIO)
    save_adapter(pm, base, out_dir)
    del pm
    model = load_adapter(base, out_dir)
    entries, logits, changed = [], {}, 0
    for text in base.candidates:
        ids = base.encode(text)
        _, base_toks, _, base_rel = base.greedy(ids)
        if not base_rel > mg.MIN_REL_GAP:
            continue
        first, toks, gap, gap_rel = mg.greedy(model, ids)
        if not gap_rel > mg.MIN_REL_GAP:
            continue
        i = len(entries)
        fname = "lora-%s-%s-%d.f32" % (base.key, name, i)
        entries.append({
            "text": text,
            "ids": ids,
            "greedy": toks,
            "base_greedy": base_toks,
            "logits_file": fname,
            "logit_min": mg.f32(first.min()),
            "logit_max": mg.f32(first.max()),
            "min_top2_gap": mg.f32(gap),
            "min_top2_gap_rel": mg.f32(gap_rel),
            "base_min_top2_gap_rel": mg.f32(base_rel),
            "first_change": next((j for j, (a, b) in enumerate(zip(toks, base_toks)) if a != b), None),
        })
        logits[fname] = first
        changed += entries[-1]["first_change"] is not None and entries[-1]["first_change"] < CHANGED_WITHIN
        if len(entries) == base.n_prompts:
            break
    if len(entries) < base.n_prompts or changed < len(entries) - 1:
        return None
    return entries, logits, model


def make_adapter(base, index, spec):
    name = spec[0]
    out_dir = os.path.join(LORA_DIR, base.key, name)
    first_seed = {"tiny": 7000, "smollm2": 8000}[base.key] + 100 * index
    for seed in range(first_seed, first_seed + SEED_TRIES):
        got = try_adapter(base, spec, seed, out_dir)
        if got is not None:
            break
    else:
        raise SystemExit("%s/%s: no seed gave enough well-separated prompts whose tokens the adapter changes"
                         % (base.key, name))
    entries, logits, model = got
    modules, layers = module_summary(model)
    ratios = list(output_delta_ratios(model, max((e["ids"] for e in entries), key=len)).values())
    changed = sum(e["first_change"] is not None and e["first_change"] < CHANGED_WITHIN for e in entries)
    with open(os.path.join(out_dir, "adapter_config.json"), encoding="utf-8") as f:
        acfg = json.load(f)
    variants = CONVERSIONS.get((base.key, name), [])
    doc = {
        "model": base.model_path,
        "adapter": rel(out_dir),
        "variants": [rel(variant_path(base.key, name, v)) for v in variants],
        "reference": REFERENCE,
        "tokenizer": base.tokenizer,
        "dtype": base.dtype,
        "vocab_size": base.vocab_size,
        "eos_token_id": base.eos_token_id,
        "lora": {
            "r": acfg["r"],
            "lora_alpha": acfg["lora_alpha"],
            "use_rslora": acfg["use_rslora"],
            "target_modules": acfg["target_modules"],
            "rank_pattern": acfg["rank_pattern"],
            "alpha_pattern": acfg["alpha_pattern"],
            "layers_to_transform": acfg["layers_to_transform"],
            "layers": layers,
            "modules": modules,
            "seed": seed,
            "calibrated_output_delta_ratio": DELTA_RATIO,
            "output_delta_ratio": {
                "note": "|LoRA output| / |base layer output| per adapted module, longest prompt's forward pass",
                "min": mg.f32(min(ratios)),
                "mean": mg.f32(sum(ratios) / len(ratios)),
                "max": mg.f32(max(ratios)),
            },
        },
        "changed_prompts": "%d of %d prompts: greedy tokens differ from base_greedy within the first %d"
        % (changed, len(entries), CHANGED_WITHIN),
        "prompts": entries,
    }
    mg.write_goldens("lora-%s-%s" % (base.key, name), doc, logits)
    print("%s/%s: seed %d, %d prompts (%d changed by the adapter), output delta ratio %.3f..%.3f"
          % (base.key, name, seed, len(entries), changed, min(ratios), max(ratios)))
    return doc, model


# ---------------------------------------------------------------------------
# Converted variants, read back independently of hack/convert-lora.py


def variant_path(base_key, name, fmt):
    d = os.path.join(LORA_DIR, base_key)
    return os.path.join(d, name + ".nemo") if fmt == "nemo" else os.path.join(d, "%s-%s" % (name, fmt))


def dims(shape, module):
    h, f = shape["hidden"], shape["ffn"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    return {Q: (h, q), K: (h, kv), V: (h, kv), O: (q, h), GATE: (h, f), UP: (h, f), DOWN: (f, h)}[module]


def peft_deltas(model):
    """{(layer, module): scale * B @ A} of a loaded PEFT model."""
    out = {}
    for layer, module, _, mod in lora_layers(model):
        a = mod.lora_A["default"].weight.detach()
        b = mod.lora_B["default"].weight.detach()
        out[(layer, module)] = mod.scaling["default"] * (b @ a)
    return out


TRT_IDS = {1: Q, 2: K, 3: V, 4: O, 5: GATE, 6: DOWN, 7: UP}


def read_trtllm(path, shape):
    w = np.load(os.path.join(path, "model.lora_weights.npy"))
    c = np.load(os.path.join(path, "model.lora_config.npy"))
    assert w.dtype == np.dtype("<f4") and c.dtype == np.dtype("<i4"), (w.dtype, c.dtype)
    assert w.ndim == 3 and c.ndim == 3 and w.shape[:2] == c.shape[:2] and c.shape[0] == 1 and c.shape[2] == 3
    out = {}
    for row, (mid, layer, r) in zip(w[0], c[0]):
        module = TRT_IDS[int(mid)]
        n_in, n_out = dims(shape, module)
        a = row[: r * n_in].reshape(r, n_in)
        b = row[r * n_in : r * n_in + n_out * r].reshape(n_out, r)
        assert not row[r * n_in + n_out * r :].any(), "padding is not zero"
        assert (int(layer), module) not in out
        out[(int(layer), module)] = torch.from_numpy(b @ a)
    return out


def read_nemo(path, shape):
    with tarfile.open(path) as tar:
        names = tar.getnames()
        cfg = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
        state = torch.load(io.BytesIO(tar.extractfile("./model_weights.ckpt").read()), weights_only=True)
    assert names == [".", "./model_config.yaml", "./model_weights.ckpt"], names
    lt = cfg["peft"]["lora_tuning"]
    scale = lt["alpha"] / lt["adapter_dim"]
    hd, nh, ng = shape["head_dim"], shape["heads"], shape["kv_heads"]
    per = nh // ng
    out = {}
    for key, t in state.items():
        parts = key.split(".")
        assert parts[:3] == ["model", "decoder", "layers"] and parts[-1] == "weight", key
        layer, adapter, which = int(parts[3]), parts[-3], parts[-2]
        if which != "linear_in":
            continue
        lin = t
        lout = state[key.replace("linear_in", "linear_out")]
        assert lin.shape[0] == lt["adapter_dim"] and lout.shape[1] == lt["adapter_dim"]
        if adapter == "lora_kqv_adapter":
            groups = lout.reshape(ng, (per + 2) * hd, -1)
            parts_out = {Q: groups[:, : per * hd].reshape(nh * hd, -1),
                         K: groups[:, per * hd : (per + 1) * hd].reshape(ng * hd, -1),
                         V: groups[:, (per + 1) * hd :].reshape(ng * hd, -1)}
        elif adapter == "lora_dense_attention_adapter":
            parts_out = {O: lout}
        elif adapter == "lora_hto4h_adapter":
            parts_out = {GATE: lout[: shape["ffn"]], UP: lout[shape["ffn"] :]}
        elif adapter == "lora_4htoh_adapter":
            parts_out = {DOWN: lout}
        else:
            raise AssertionError(key)
        for module, o in parts_out.items():
            out[(layer, module)] = scale * (o @ lin)
    return out, cfg


def check_deltas(label, got, want):
    worst = 0.0
    for key in sorted(set(got) | set(want)):
        g = got.get(key)
        w = want.get(key)
        if w is None:
            # A fused NeMo block may carry a module PEFT does not adapt: it
            # must be exactly zero.
            if g.abs().max() != 0:
                raise SystemExit("%s: layer %d %s has a weight change PEFT does not" % (label, *key))
            continue
        if g is None:
            raise SystemExit("%s: layer %d %s is missing" % (label, *key))
        worst = max(worst, float((g - w).abs().max() / w.abs().max()))
    if worst > 1e-5:
        raise SystemExit("%s: weight changes differ from PEFT's by %.3g of their range" % (label, worst))
    return worst


@torch.no_grad()
def check_merged(label, base, deltas, doc, logits_dir):
    """The base model with the weight changes merged in must give the
    golden greedy tokens; returns the largest first-logit difference relative
    to the logit range."""
    model = copy.deepcopy(base.model)
    mods = dict(model.named_modules())
    for (layer, module), d in deltas.items():
        part = "self_attn" if module in (Q, K, V, O) else "mlp"
        w = mods["model.layers.%d.%s.%s" % (layer, part, module)].weight
        w += d.to(w.dtype)
    worst = 0.0
    for e in doc["prompts"]:
        first, toks, _, _ = mg.greedy(model, e["ids"])
        if toks != e["greedy"]:
            raise SystemExit("%s: merged weights give other tokens on %r" % (label, e["text"][:40]))
        ref = np.fromfile(os.path.join(logits_dir, e["logits_file"]), dtype="<f4")
        worst = max(worst, float(np.abs(first - ref).max() / (ref.max() - ref.min())))
    if worst > 1e-4:
        raise SystemExit("%s: merged logits differ by %.3g of the range" % (label, worst))
    return worst


def convert_and_check(base, name, doc, model):
    src = os.path.join(LORA_DIR, base.key, name)
    want = peft_deltas(model)
    for fmt in CONVERSIONS.get((base.key, name), []):
        dst = variant_path(base.key, name, fmt)
        label = rel(dst)
        if fmt == "bin":
            cl.write_bin(src, dst)
            # PEFT itself loads adapter_model.bin when there is no
            # safetensors file: the outputs must be bit-identical.
            vm = load_adapter(base, dst)
            for e in doc["prompts"]:
                first, toks, _, _ = mg.greedy(vm, e["ids"])
                ref = np.fromfile(os.path.join(mg.GOLDENS, e["logits_file"]), dtype="<f4")
                if toks != e["greedy"] or not np.array_equal(first, ref):
                    raise SystemExit("%s: PEFT gives other outputs from the .bin" % label)
            print("  %s: PEFT loads it, outputs bit-identical" % label)
            continue
        if fmt == "trtllm":
            cl.write_trtllm(src, dst)
            got = read_trtllm(dst, base.shape)
        else:
            cl.write_nemo(src, dst, os.path.join(ROOT, base.name_or_path))
            got, _ = read_nemo(dst, base.shape)
        dw = check_deltas(label, got, want)
        dl = check_merged(label, base, got, doc, mg.GOLDENS)
        print("  %s: weight changes within %.2g of PEFT's, merged model gives the golden tokens "
              "(first logits within %.2g of the range)" % (label, dw, dl))


# ---------------------------------------------------------------------------
# The mixed-batch golden


def make_mixed(base, models):
    slots = MIXED_ADAPTERS + [None]
    used = set()
    requests = []
    for i in range(MIXED_REQUESTS):
        adapter = slots[i % len(slots)]
        model = base.model if adapter is None else models[adapter]
        for j in range(len(MIXED_TEXTS)):
            text = MIXED_TEXTS[(i + j) % len(MIXED_TEXTS)]
            if (adapter, text) in used:
                continue
            ids = base.encode(text)
            if adapter is None:
                _, toks, _, gap_rel = base.greedy(ids)
            else:
                _, toks, _, gap_rel = mg.greedy(model, ids)
            if gap_rel > mg.MIN_REL_GAP:
                break
        else:
            raise SystemExit("mixed: no well-separated prompt left for %s" % adapter)
        used.add((adapter, text))
        requests.append({"adapter": adapter, "text": text, "ids": ids, "greedy": toks,
                         "min_top2_gap_rel": mg.f32(gap_rel)})
    doc = {
        "model": base.model_path,
        "reference": REFERENCE,
        "tokenizer": base.tokenizer,
        "adapters": {a: rel(os.path.join(LORA_DIR, "tiny", a)) for a in MIXED_ADAPTERS},
        "note": "each request decoded alone (batch size 1) with its adapter (null: the bare model), 32 "
        "argmax steps; a batched run mixing all of them must give the same greedy tokens",
        "requests": requests,
    }
    mg.write_json(os.path.join(mg.GOLDENS, "lora-tiny-mixed.json"), doc)
    lens = sorted(len(r["ids"]) for r in requests)
    print("tiny/mixed: %d requests, prompt lengths %d..%d" % (len(requests), lens[0], lens[-1]))


# ---------------------------------------------------------------------------


def make_all(base, specs, keep):
    """Makes every adapter of specs; returns the loaded models when keep."""
    os.makedirs(os.path.join(LORA_DIR, base.key), exist_ok=True)
    models = {}
    for i, spec in enumerate(specs):
        doc, model = make_adapter(base, i, spec)
        convert_and_check(base, spec[0], doc, model)
        if keep:
            models[spec[0]] = model
    return models


def make_tiny():
    base = tiny_base()
    models = make_all(base, TINY_ADAPTERS, True)
    make_mixed(base, models)


def make_smollm2():
    base = smol_base()
    make_all(base, SMOL_ADAPTERS, False)
    size = dir_bytes([os.path.join(LORA_DIR, "smollm2", s[0]) for s in SMOL_ADAPTERS])
    if size >= MAX_SMOL_ADAPTER_BYTES:
        raise SystemExit("smollm2 adapters take %d bytes, over 4 MB" % size)


def dir_bytes(paths):
    total = 0
    for p in paths:
        if os.path.isfile(p):
            total += os.path.getsize(p)
        for d, _, files in os.walk(p):
            total += sum(os.path.getsize(os.path.join(d, f)) for f in files)
    return total


def main(argv):
    jobs = {"tiny": make_tiny, "smollm2": make_smollm2}
    wanted = argv[1:] or list(jobs)
    for w in wanted:
        if w not in jobs:
            raise SystemExit("usage: hack/make-lora-goldens.py [tiny|smollm2 ...]")
    mg.setup_torch()
    for w in wanted:
        jobs[w]()
    goldens = [os.path.join(mg.GOLDENS, f) for f in os.listdir(mg.GOLDENS) if f.startswith("lora-")]
    total = dir_bytes([LORA_DIR] + goldens)
    print("fixtures: %d bytes (tests/fixtures/lora and tests/fixtures/goldens/lora-*)" % total)
    if total >= MAX_FIXTURE_BYTES:
        raise SystemExit("LoRA fixtures take %d bytes, over 8 MB" % total)


if __name__ == "__main__":
    main(sys.argv)
