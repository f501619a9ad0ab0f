#!/usr/bin/env python3
"""Builds the adapter-interop fixtures: PEFT adapters that real files in the
wild look like but the fixtures of make-lora-goldens.py do not, with goldens
from transformers + peft.

  tests/fixtures/lora/tiny/r8-all-partial/   tiny/r8-all without the tensors
                                             of some modules its config
                                             targets (layer 0's down_proj,
                                             all four attention projections
                                             of layer 1): peft loads it and
                                             leaves those modules at their
                                             initial B = 0
  tests/fixtures/lora/tiny/r4-qv-bias-all/   tiny/r4-qv saved by peft with
                                             bias="all": the tiny model has no
                                             biases, so the file holds none
  tests/fixtures/goldens/lora-tiny-<name>.json, lora-tiny-<name>-<i>.f32
                                             as make-lora-goldens.py writes
                                             them, computed by
                                             PeftModel.from_pretrained over
                                             the saved directory

The script checks what the fixtures are for: that peft really leaves the
dropped modules' B at zero and loads every other weight from the file, that
the partial adapter's tokens differ from the whole r8-all's on some prompt
(so a reader that kept the dropped modules would fail the goldens), and that
the bias="all" file holds exactly r4-qv's tensors.

Needs the reference venv with peft (hack/README.md) and the fixtures of
make-lora-goldens.py tiny. Deterministic: rerunning gives byte-identical
files. About 10 s.

usage: hack/make-lora-interop.py
"""

import copy
import json
import os
import shutil
import sys

sys.dont_write_bytecode = True

HACK = os.path.dirname(os.path.abspath(__file__))


from sibling import load_script  # noqa: E402


mlg = load_script("make_lora_goldens", "make-lora-goldens.py")
mg = mlg.mg

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

TINY = os.path.join(mlg.LORA_DIR, "tiny")
PARTIAL = "r8-all-partial"
BIAS_ALL = "r4-qv-bias-all"
# (layer, module path) pairs of r8-all whose tensors the partial file lacks
DROPPED = [
    (0, "mlp.down_proj"),
    (1, "self_attn.q_proj"),
    (1, "self_attn.k_proj"),
    (1, "self_attn.v_proj"),
    (1, "self_attn.o_proj"),
]


def tensor_key(layer, module, ab):
    return "base_model.model.model.layers.%d.%s.lora_%s.weight" % (layer, module, ab)


def absent_modules():
    """{"q_proj": [1], ...}: what the agent's load response lists."""
    out = {}
    for layer, module in DROPPED:
        out.setdefault(module.split(".")[1], []).append(layer)
    return {m: sorted(out[m]) for m in mlg.ALL7 if m in out}


def pick_prompts(base, model, name):
    """The first base.n_prompts candidates without a near-tie, with and
    without the adapter, as make-lora-goldens.py picks them (from its
    candidates, then the texts of its mixed batch)."""
    entries, logits = [], {}
    extra = [t for t in mlg.MIXED_TEXTS if t and t not in base.candidates]
    for text in base.candidates + extra:
        ids = base.encode(text)
        _, base_toks, _, base_rel = base.greedy(ids)
        if not base_rel > mg.MIN_REL_GAP:
            continue
        first, toks, gap, gap_rel = mg.greedy(model, ids)
        if not gap_rel > mg.MIN_REL_GAP:
            continue
        fname = "lora-%s-%s-%d.f32" % (base.key, name, len(entries))
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
        if len(entries) == base.n_prompts:
            return entries, logits
    raise SystemExit("%s: only %d well-separated prompts" % (name, len(entries)))


def write_doc(base, name, model, note, extra):
    with open(os.path.join(TINY, name, "adapter_config.json"), encoding="utf-8") as f:
        acfg = json.load(f)
    entries, logits = pick_prompts(base, model, name)
    doc = {
        "model": base.model_path,
        "adapter": mlg.rel(os.path.join(TINY, name)),
        "variants": [],
        "reference": mlg.REFERENCE,
        "tokenizer": base.tokenizer,
        "dtype": base.dtype,
        "vocab_size": base.vocab_size,
        "eos_token_id": base.eos_token_id,
        "note": note,
        "lora": {
            "r": acfg["r"],
            "lora_alpha": acfg["lora_alpha"],
            "bias": acfg["bias"],
            "target_modules": acfg["target_modules"],
        },
        "prompts": entries,
    }
    doc.update(extra)
    mg.write_goldens("lora-%s-%s" % (base.key, name), doc, logits)
    return entries


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.makedirs(path)


@torch.no_grad()
def make_partial(base):
    src = os.path.join(TINY, "r8-all")
    dst = os.path.join(TINY, PARTIAL)
    weights = load_file(os.path.join(src, "adapter_model.safetensors"))
    drop = {tensor_key(layer, m, ab) for layer, m in DROPPED for ab in "AB"}
    missing = drop - set(weights)
    if missing:
        raise SystemExit("r8-all has no %s" % sorted(missing))
    kept = {k: v for k, v in sorted(weights.items()) if k not in drop}
    fresh_dir(dst)
    save_file(kept, os.path.join(dst, "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(os.path.join(src, "adapter_config.json"), os.path.join(dst, "adapter_config.json"))
    for f in os.listdir(dst):
        os.chmod(os.path.join(dst, f), 0o644)

    model = mlg.load_adapter(base, dst)
    for layer, module, _, mod in mlg.lora_layers(model):
        path = next(p for p in ("self_attn." + module, "mlp." + module) if tensor_key(layer, p, "A") in weights)
        a, b = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        if (layer, path) in DROPPED:
            if b.abs().max() != 0:
                raise SystemExit("peft did not leave layer %d %s's B at zero" % (layer, module))
        elif not (torch.equal(a, weights[tensor_key(layer, path, "A")])
                  and torch.equal(b, weights[tensor_key(layer, path, "B")])):
            raise SystemExit("peft did not load layer %d %s from the file" % (layer, module))

    whole = mlg.load_adapter(base, src)
    entries = write_doc(
        base, PARTIAL, model,
        "tiny/r8-all without the tensors of absent_modules, which its config targets; peft leaves "
        "their B at zero, so they add nothing",
        {"absent_modules": absent_modules()})
    differ = sum(mg.greedy(whole, e["ids"])[1] != e["greedy"] for e in entries)
    changed = sum(e["greedy"] != e["base_greedy"] for e in entries)
    if not differ or not changed:
        raise SystemExit("%s: tokens differ from r8-all's on %d prompts and from the base model's on %d; "
                         "the fixture would prove nothing" % (PARTIAL, differ, changed))
    print("tiny/%s: %d prompts, %d differ from r8-all's tokens, %d from the base model's"
          % (PARTIAL, len(entries), differ, changed))


@torch.no_grad()
def make_bias_all(base):
    src = os.path.join(TINY, "r4-qv")
    dst = os.path.join(TINY, BIAS_ALL)
    with open(os.path.join(src, "adapter_config.json"), encoding="utf-8") as f:
        scfg = json.load(f)
    weights = load_file(os.path.join(src, "adapter_model.safetensors"))
    config = LoraConfig(r=scfg["r"], lora_alpha=scfg["lora_alpha"], target_modules=scfg["target_modules"],
                        lora_dropout=0.0, bias="all", task_type="CAUSAL_LM")
    pm = get_peft_model(copy.deepcopy(base.model), config)
    res = set_peft_model_state_dict(pm, weights)
    if res.unexpected_keys:
        raise SystemExit("r4-qv tensors peft did not take: %s" % res.unexpected_keys)
    fresh_dir(dst)
    mlg.save_adapter(pm, base, dst)
    saved = load_file(os.path.join(dst, "adapter_model.safetensors"))
    if saved.keys() != weights.keys() or any(not torch.equal(saved[k], weights[k]) for k in saved):
        raise SystemExit("%s does not hold exactly r4-qv's tensors: %s" % (BIAS_ALL, sorted(saved)))
    with open(os.path.join(dst, "adapter_config.json"), encoding="utf-8") as f:
        if json.load(f)["bias"] != "all":
            raise SystemExit("%s: peft did not save bias 'all'" % BIAS_ALL)
    model = mlg.load_adapter(base, dst)
    entries = write_doc(
        base, BIAS_ALL, model,
        "tiny/r4-qv's weights saved by peft with bias=\"all\"; the model has no biases, so the file "
        "holds none and the adapter computes what bias=\"none\" does", {})
    print("tiny/%s: %d prompts" % (BIAS_ALL, len(entries)))


def main():
    mg.setup_torch()
    base = mlg.tiny_base()
    make_partial(base)
    make_bias_all(base)


if __name__ == "__main__":
    main()
