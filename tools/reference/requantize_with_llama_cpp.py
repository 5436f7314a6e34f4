#!/usr/bin/env python3
"""Write SmolLM2 in the GGML types no shipped model uses, with llama.cpp's own quantizer
(`llama_model_quantize` from llama-cpp-python), for `make_quant_data.py`. Run once, outside
the project:

    pip install llama-cpp-python==0.3.36
    python3 tools/reference/requantize_with_llama_cpp.py SmolLM2.gguf OUT_DIR

Writes OUT_DIR/smollm2-<type>.gguf for F16, BF16, Q4_0, Q5_1, Q2_K, Q3_K_M and Q5_K_M
(llama.cpp keeps other types for tensors whose rows do not divide into 256-value blocks,
and its k-quant mixes give SmolLM2 few or no tensors of the named type: those files are
written "pure", every tensor that can be of that type, which is every layer's ffn_down).
"""

import os
import sys

import llama_cpp

# llama.cpp's file types (llama_ftype in llama.h)
FTYPES = {
    "F16": (1, False),
    "Q4_0": (2, False),
    "Q5_1": (9, False),
    "Q2_K": (10, True),
    "Q3_K_M": (12, True),
    "Q5_K_M": (17, True),
    "BF16": (32, False),
}


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    src, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    for name, (ftype, pure) in FTYPES.items():
        out = os.path.join(out_dir, f"smollm2-{name.lower()}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True
        params.pure = pure
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(src.encode(), out.encode(), params)
        print(f"{name}: {out} (rc {rc})", file=sys.stderr)
        if rc != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
