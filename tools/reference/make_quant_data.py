#!/usr/bin/env python3
"""Reference data for Veil's GGML dequantization: real blocks from real GGUF files and what
the `gguf` Python package (llama.cpp's own reference, `gguf.quants.dequantize`) makes of
them. Run once, outside the project; the output is committed as
`model/kernels/tests/data/gguf_py_blocks.json` and read by `model/kernels/tests/gguf_py.rs`.

    pip install gguf==0.19.0 numpy
    python3 tools/reference/make_quant_data.py FILE.gguf [FILE.gguf ...] --out OUT.json

For every tensor type found (the first file that has it wins), a few blocks are taken from
the middle of the first tensor of that type, so that the data is real model weights, not
noise. Types that no shipped model uses (F16, BF16, Q4_0, Q5_1, Q2_K, Q3_K, Q5_K) come from
files that llama.cpp's own quantizer wrote from SmolLM2 (`llama_model_quantize` through
llama-cpp-python; see `--help`).
"""

import argparse
import importlib.metadata
import json
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

# How many blocks (32-value formats) or super-blocks (256-value k-quants) to keep.
BLOCKS = {"small": 8, "k": 2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    cases = {}
    for path in args.files:
        reader = gguf.GGUFReader(path)
        for t in reader.tensors:
            qtype = T(t.tensor_type)
            name = qtype.name
            if name in cases or qtype == T.F32:
                continue
            block_values, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            if block_values == 1:  # F16, BF16: treat 32 values as one "block"
                block_values, block_bytes = 32, 32 * block_bytes
            raw = np.asarray(t.data).view(np.uint8).reshape(-1)
            n_blocks = raw.size // block_bytes
            keep = BLOCKS["k" if block_values == 256 else "small"]
            if n_blocks < keep:
                continue
            start = (n_blocks // 2) * block_bytes
            chunk = raw[start:start + keep * block_bytes].copy()
            values = dequantize(chunk.reshape(keep, block_bytes), qtype).reshape(-1).astype(np.float32)
            cases[name] = {
                "source": f"{path.split('/')[-1]}: {t.name}, bytes {start}..{start + chunk.size}",
                "blocks_hex": chunk.tobytes().hex(),
                "values_f32_le_hex": values.tobytes().hex(),
            }
            print(f"{name:6s} from {t.name} ({keep} blocks)", file=sys.stderr)
    json.dump({"gguf_py": importlib.metadata.version("gguf"), "cases": cases}, open(args.out, "w"), indent=1)
    print(f"wrote {args.out}: {sorted(cases)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
