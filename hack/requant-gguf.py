#!/usr/bin/env python3
"""Writes a copy of a GGUF model with every matrix in another weight type,
for speed measurements of the CPU kernels on each format (docs/benchmarks.md,
"Decode batch sweep"). The metadata is copied as it is (general.file_type
set to the new type); 1-D tensors (norms) stay F32; every tensor of a block
or half type is dequantized with the gguf package's reference and
quantized again to TYPE. Requantizing an already quantized model loses a
little accuracy: the copies are for timing, not for quality.

Needs the reference venv (hack/README.md). The 135M default model takes
about a minute per type.

usage: hack/requant-gguf.py SRC.gguf DST.gguf TYPE   (TYPE: q4_0 q4_1 q8_0 f16 bf16 f32)
"""

import sys

import gguf
import numpy as np

TYPES = {
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
}


def main(argv):
    if len(argv) != 4 or argv[3] not in TYPES:
        raise SystemExit(__doc__.strip().splitlines()[-1])
    src, dst, tname = argv[1:]
    qtype, ftype = TYPES[tname]
    r = gguf.GGUFReader(src)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    w = gguf.GGUFWriter(dst, arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE:
            continue
        if f.name == gguf.Keys.General.FILE_TYPE:
            w.add_key_value(f.name, int(ftype), gguf.GGUFValueType.UINT32)
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if len(t.shape) == 1:
            w.add_tensor(t.name, data.reshape(-1))
        elif qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(t.name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(t.name, data.astype(np.float16))
        else:
            w.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main(sys.argv)
