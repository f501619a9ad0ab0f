#!/usr/bin/env python3
"""Converts a Hugging Face PEFT LoRA adapter into the other formats loraplane
reads, written from the formats' descriptions (tests/fixtures/lora/FORMATS.md
has the exact layouts; hack/README.md the sources):

  bin     <dst>/adapter_config.json + adapter_model.bin: the same PEFT
          adapter with the weights written by torch.save (PyTorch's zip
          checkpoint) instead of safetensors
  trtllm  <dst>/model.lora_config.npy + model.lora_weights.npy: TensorRT-LLM's
          LoRA layout, one row per (layer, module), the scale folded into B,
          float32
  nemo    <dst> (a .nemo file): a tar of model_config.yaml (with NeMo's
          `peft` section) and model_weights.ckpt (torch.save), Megatron's
          fused adapters: q/k/v as one lora_kqv_adapter (rows interleaved
          per query group), gate/up as one lora_hto4h_adapter (gate first)

Every conversion is exact (no rounding beyond float32 products): fused NeMo
adapters stack the separate PEFT A matrices and place the B matrices
block-diagonally.

usage: hack/convert-lora.py bin|trtllm|nemo SRC_PEFT_DIR DST [--base PATH]

--base (nemo only) names the base model, whose shape NeMo's fused layout
needs: a Hugging Face model directory (config.json) or a GGUF file. Without
it, the adapter's base_model_name_or_path is used when it is a local
directory.

Needs the reference venv (hack/README.md): torch, numpy, safetensors, yaml,
gguf (for a GGUF --base). Deterministic: the same input gives byte-identical
output.
"""

import collections
import io
import json
import math
import os
import re
import shutil
import sys
import tarfile
import tempfile

import numpy as np
import safetensors
import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# HF module name -> TensorRT-LLM LoRA module id. The names and ids are those
# of TensorRT-LLM's LoraManager.LORA_MODULE_IDS; the HF -> TensorRT-LLM name
# mapping is that of examples/hf_lora_convert.py for Llama, where gate_proj
# (the SiLU-activated input) is mlp_h_to_4h and up_proj is mlp_gate.
TRTLLM_MODULE_IDS = {
    "q_proj": 1,  # attn_q
    "k_proj": 2,  # attn_k
    "v_proj": 3,  # attn_v
    "o_proj": 4,  # attn_dense
    "gate_proj": 5,  # mlp_h_to_4h
    "down_proj": 6,  # mlp_4h_to_h
    "up_proj": 7,  # mlp_gate
}

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

KEY_RE = re.compile(
    r"^base_model\.model\.(?P<module_key>model\.layers\.(?P<layer>\d+)\."
    r"(?:self_attn|mlp)\.(?P<module>[a-z_]+))\.lora_(?P<ab>[AB])\.weight$"
)

NEMO_PREFIX = "model.decoder.layers.%d."
NEMO_ADAPTERS = (
    # (NeMo adapter key, NeMo target module name, HF modules fused, in order)
    ("self_attention.adapter_layer.lora_kqv_adapter", "attention_qkv", ("q_proj", "k_proj", "v_proj")),
    ("self_attention.adapter_layer.lora_dense_attention_adapter", "attention_dense", ("o_proj",)),
    ("mlp.adapter_layer.lora_hto4h_adapter", "mlp_fc1", ("gate_proj", "up_proj")),
    ("mlp.adapter_layer.lora_4htoh_adapter", "mlp_fc2", ("down_proj",)),
)


class ConvertError(Exception):
    pass


# ---------------------------------------------------------------------------
# Reading a PEFT adapter


def pattern_key(patterns, module_key):
    """The first key of patterns (a dict, in order) that PEFT's
    get_pattern_key would pick for module_key: the key, a regular
    expression, must match the end of the module name at a '.' boundary."""
    for key in patterns:
        if re.match(r"(.*\.)?(%s)$" % key, module_key):
            return key
    return None


def module_scale(cfg, module_key, rank):
    """(alpha, scale) PEFT uses for the module, honouring rank_pattern,
    alpha_pattern and use_rslora."""
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rk = pattern_key(rank_pattern, module_key)
    r = rank_pattern[rk] if rk is not None else cfg["r"]
    if r != rank:
        raise ConvertError("'%s': lora_A has rank %d, adapter_config.json says %d" % (module_key, rank, r))
    ak = pattern_key(alpha_pattern, module_key)
    alpha = alpha_pattern[ak] if ak is not None else cfg["lora_alpha"]
    if cfg.get("use_rslora"):
        return alpha, alpha / math.sqrt(r)
    return alpha, alpha / r


class Pair:
    def __init__(self, layer, module, module_key, a, b, alpha, scale):
        self.layer, self.module, self.module_key = layer, module, module_key
        self.a, self.b = a, b  # torch float32, [r, in] and [out, r]
        self.alpha, self.scale = alpha, scale

    @property
    def rank(self):
        return self.a.shape[0]


def read_peft(src):
    """Returns (adapter_config dict, [Pair] in the file's key order,
    {key: tensor} as stored)."""
    with open(os.path.join(src, "adapter_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ConvertError("%s: peft_type is not LORA" % src)
    for k in ("use_dora", "fan_in_fan_out"):
        if cfg.get(k):
            raise ConvertError("%s: %s is not supported" % (src, k))
    path = os.path.join(src, "adapter_model.safetensors")
    tensors = collections.OrderedDict()
    with safetensors.safe_open(path, "pt") as st:
        for key in st.keys():
            tensors[key] = st.get_tensor(key)
    groups = collections.OrderedDict()
    for key, t in tensors.items():
        m = KEY_RE.match(key)
        if not m:
            raise ConvertError("%s: unexpected tensor '%s'" % (path, key))
        if m.group("module") not in MODULES:
            raise ConvertError("%s: unsupported module '%s'" % (path, m.group("module")))
        if t.dtype != torch.float32 or t.dim() != 2:
            raise ConvertError("%s: '%s' is not a 2-D float32 tensor" % (path, key))
        g = groups.setdefault(m.group("module_key"), {"layer": int(m.group("layer")), "module": m.group("module")})
        g[m.group("ab")] = t
    pairs = []
    for module_key, g in groups.items():
        if "A" not in g or "B" not in g:
            raise ConvertError("%s: '%s' lacks lora_A or lora_B" % (path, module_key))
        a, b = g["A"], g["B"]
        if a.shape[0] != b.shape[1]:
            raise ConvertError("%s: '%s' A and B ranks differ" % (path, module_key))
        alpha, scale = module_scale(cfg, module_key, a.shape[0])
        pairs.append(Pair(g["layer"], g["module"], module_key, a, b, alpha, scale))
    return cfg, pairs, tensors


# ---------------------------------------------------------------------------
# Writers


def fresh_dir(path):
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    os.makedirs(path)


def write_bin(src, dst):
    """The PEFT adapter with adapter_model.bin written by torch.save."""
    _, _, tensors = read_peft(src)
    fresh_dir(dst)
    shutil.copyfile(os.path.join(src, "adapter_config.json"), os.path.join(dst, "adapter_config.json"))
    # Each tensor its own contiguous storage, as PEFT's own
    # save_pretrained(safe_serialization=False) writes them.
    state = {k: t.contiguous().clone() for k, t in tensors.items()}
    torch.save(state, os.path.join(dst, "adapter_model.bin"))
    for f in os.listdir(dst):
        os.chmod(os.path.join(dst, f), 0o644)


def write_trtllm(src, dst):
    """model.lora_config.npy int32 [1, N, 3] (module id, layer, rank) and
    model.lora_weights.npy float32 [1, N, max_row] (A [r, in] flattened, then
    scale * B [out, r] flattened, zero-padded), rows in the order TensorRT-
    LLM's converter writes them: the safetensors key order (layers sorted as
    strings, modules alphabetically)."""
    _, pairs, _ = read_peft(src)
    rows, config = [], []
    # hf_lora_convert.py groups by layer, then module, in key order.
    by_layer = collections.OrderedDict()
    for p in pairs:
        by_layer.setdefault(p.layer, []).append(p)
    for layer, ps in by_layer.items():
        for p in ps:
            r, n_in = p.a.shape
            n_out = p.b.shape[0]
            # TensorRT-LLM's converter decides which dimension is the rank
            # by size; a rank above in or out would be stored transposed.
            if r > n_in or r > n_out:
                raise ConvertError("'%s': rank %d exceeds a dimension (%d, %d); TensorRT-LLM's "
                                   "layout would be ambiguous" % (p.module_key, r, n_in, n_out))
            b = (p.b * p.scale).to(torch.float32)
            rows.append(torch.cat([p.a.reshape(-1), b.reshape(-1)]).numpy())
            config.append([TRTLLM_MODULE_IDS[p.module], layer, r])
    max_row = max(len(x) for x in rows)
    weights = np.zeros((1, len(rows), max_row), dtype="<f4")
    for i, x in enumerate(rows):
        weights[0, i, : len(x)] = x
    fresh_dir(dst)
    np.save(os.path.join(dst, "model.lora_weights.npy"), weights)
    np.save(os.path.join(dst, "model.lora_config.npy"), np.array([config], dtype="<i4"))
    for f in os.listdir(dst):
        os.chmod(os.path.join(dst, f), 0o644)


def base_shape(path):
    """{layers, hidden, ffn, heads, kv_heads, head_dim} of a HF model
    directory or a GGUF file."""
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            c = json.load(f)
        heads = c["num_attention_heads"]
        return {
            "layers": c["num_hidden_layers"],
            "hidden": c["hidden_size"],
            "ffn": c["intermediate_size"],
            "heads": heads,
            "kv_heads": c.get("num_key_value_heads") or heads,
            "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
        }
    import gguf

    reader = gguf.GGUFReader(path)

    def field(name, default=None):
        f = reader.get_field(name)
        if f is None:
            if default is None:
                raise ConvertError("%s: no '%s'" % (path, name))
            return default
        return int(f.parts[f.data[0]][0])

    arch = bytes(reader.get_field("general.architecture").parts[-1]).decode()
    heads = field(arch + ".attention.head_count")
    hidden = field(arch + ".embedding_length")
    return {
        "layers": field(arch + ".block_count"),
        "hidden": hidden,
        "ffn": field(arch + ".feed_forward_length"),
        "heads": heads,
        "kv_heads": field(arch + ".attention.head_count_kv", heads),
        "head_dim": field(arch + ".attention.key_length", hidden // heads),
    }


def megatron_qkv_rows(shape):
    """Row indices into concat(q, k, v) rows (HF order) that give Megatron's
    fused QKV order: per query group g, the group's heads_per_group query
    heads, then key head g, then value head g."""
    hd, nh, ng = shape["head_dim"], shape["heads"], shape["kv_heads"]
    per = nh // ng
    q_rows, k_rows = nh * hd, ng * hd
    order = []
    for g in range(ng):
        order.extend(range(g * per * hd, (g + 1) * per * hd))  # q heads of group g
        order.extend(range(q_rows + g * hd, q_rows + (g + 1) * hd))  # k head g
        order.extend(range(q_rows + k_rows + g * hd, q_rows + k_rows + (g + 1) * hd))  # v head g
    return torch.tensor(order, dtype=torch.long)


def module_dims(shape, module):
    h, f = shape["hidden"], shape["ffn"]
    q, kv = shape["heads"] * shape["head_dim"], shape["kv_heads"] * shape["head_dim"]
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, f),
        "up_proj": (h, f),
        "down_proj": (f, h),
    }[module]


def nemo_state(pairs, shape):
    """The NeMo state dict (unpadded), adapter_dim, alpha, target modules and
    layers."""
    scales = sorted(set(p.scale for p in pairs))
    if len(scales) != 1:
        raise ConvertError("modules have different scales %s; NeMo has one alpha / adapter_dim" % scales)
    scale = scales[0]
    by = {(p.layer, p.module): p for p in pairs}
    layers = sorted(set(p.layer for p in pairs))
    for p in pairs:
        if p.layer >= shape["layers"]:
            raise ConvertError("'%s': the base model has %d layers" % (p.module_key, shape["layers"]))
        n_in, n_out = module_dims(shape, p.module)
        if tuple(p.a.shape) != (p.rank, n_in) or tuple(p.b.shape) != (n_out, p.rank):
            raise ConvertError("'%s': shapes %s, %s do not fit the base model"
                               % (p.module_key, tuple(p.a.shape), tuple(p.b.shape)))
    qkv_order = megatron_qkv_rows(shape)
    fused = []  # (layer, adapter key, linear_in, linear_out)
    targets = set()
    for layer in layers:
        for akey, target, modules in NEMO_ADAPTERS:
            present = [m for m in modules if (layer, m) in by]
            if not present:
                continue
            targets.add(target)
            n_in = module_dims(shape, modules[0])[0]
            outs = [module_dims(shape, m)[1] for m in modules]
            rank = sum(by[(layer, m)].rank for m in present)
            lin = torch.zeros(rank, n_in)
            lout = torch.zeros(sum(outs), rank)
            col, row = 0, 0
            for m, n_out in zip(modules, outs):
                p = by.get((layer, m))
                if p is not None:
                    lin[col : col + p.rank] = p.a
                    lout[row : row + n_out, col : col + p.rank] = p.b
                    col += p.rank
                row += n_out
            if target == "attention_qkv":
                lout = lout[qkv_order]
            fused.append((layer, akey, lin, lout))
    adapter_dim = max(lin.shape[0] for _, _, lin, _ in fused)
    state = collections.OrderedDict()
    for layer, akey, lin, lout in fused:
        # NeMo has one adapter_dim: pad every adapter to it with zero rows of
        # linear_in and zero columns of linear_out (exact).
        pad = adapter_dim - lin.shape[0]
        lin = torch.cat([lin, torch.zeros(pad, lin.shape[1])])
        lout = torch.cat([lout, torch.zeros(lout.shape[0], pad)], dim=1)
        prefix = NEMO_PREFIX % layer + akey
        state[prefix + ".linear_in.weight"] = lin.contiguous()
        state[prefix + ".linear_out.weight"] = lout.contiguous()
    alpha = scale * adapter_dim
    if float(alpha).is_integer():
        alpha = int(alpha)
    order = [t for _, t, _ in NEMO_ADAPTERS if t in targets]
    return state, adapter_dim, alpha, order, layers


def write_nemo(src, dst, base=None):
    """A .nemo tar: ./model_config.yaml and ./model_weights.ckpt."""
    cfg, pairs, _ = read_peft(src)
    if base is None:
        name = cfg.get("base_model_name_or_path") or ""
        cand = name if os.path.isabs(name) else os.path.join(ROOT, name)
        if not name or not os.path.isfile(os.path.join(cand, "config.json")):
            raise ConvertError("base model %r is not a local directory; pass --base" % name)
        base = cand
    shape = base_shape(base)
    state, adapter_dim, alpha, targets, layers = nemo_state(pairs, shape)
    model_cfg = {
        "mcore_gpt": True,
        "restore_from_path": cfg.get("base_model_name_or_path"),
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "precision": 32,
        "num_layers": shape["layers"],
        "hidden_size": shape["hidden"],
        "ffn_hidden_size": shape["ffn"],
        "num_attention_heads": shape["heads"],
        "num_query_groups": shape["kv_heads"],
        "kv_channels": shape["head_dim"],
        "activation": "fast-swiglu",
        "normalization": "rmsnorm",
        "position_embedding_type": "rope",
        "bias": False,
        "peft": {
            "peft_scheme": "lora",
            "restore_from_path": None,
            "lora_tuning": {
                "variant": "nemo",
                "target_modules": targets,
                "adapter_dim": adapter_dim,
                "alpha": alpha,
                "adapter_dropout": 0.0,
                "column_init_method": "xavier",
                "row_init_method": "zero",
                # 1-based, as NeMo counts them; null: every layer.
                "layer_selection": None if len(layers) == shape["layers"] else [x + 1 for x in layers],
                "weight_tying": False,
                "position_embedding_strategy": None,
            },
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "model_weights.ckpt")
        torch.save(dict(state), ckpt)  # a plain dict, as NeMo's get_peft_state_dict
        with open(ckpt, "rb") as f:
            ckpt_bytes = f.read()
    yaml_bytes = yaml.safe_dump(model_cfg, sort_keys=False, default_flow_style=False).encode()
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    # As NeMo's SaveRestoreConnector packs a folder (tar.add(dir, arcname=".")):
    # an uncompressed tar with "./" names; fixed metadata for reproducibility.
    with tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tar:
        d = tarfile.TarInfo(".")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        tar.addfile(d)
        for name, data in (("./model_config.yaml", yaml_bytes), ("./model_weights.ckpt", ckpt_bytes)):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
            tar.addfile(ti, io.BytesIO(data))
    os.chmod(dst, 0o644)


WRITERS = {"bin": write_bin, "trtllm": write_trtllm, "nemo": write_nemo}


def main(argv):
    args = argv[1:]
    base = None
    if "--base" in args:
        i = args.index("--base")
        if i + 1 >= len(args):
            raise SystemExit("--base needs a path")
        base = args[i + 1]
        del args[i : i + 2]
    if len(args) != 3 or args[0] not in WRITERS:
        raise SystemExit("usage: hack/convert-lora.py bin|trtllm|nemo SRC_PEFT_DIR DST [--base PATH]")
    fmt, src, dst = args
    try:
        if fmt == "nemo":
            write_nemo(src, dst, base)
        else:
            WRITERS[fmt](src, dst)
    except ConvertError as e:
        raise SystemExit("convert-lora: %s" % e)
    print("%s -> %s (%s)" % (src, dst, fmt))


if __name__ == "__main__":
    main(sys.argv)
