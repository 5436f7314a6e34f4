#!/usr/bin/env python3
"""Reference data for Veil's architecture tests, computed by llama.cpp outside the project.

Run once (not part of the test suite); the output is committed as test data:

    pip install --target /tmp/llama-site llama-cpp-python==0.3.36 numpy
    cargo build --release -p veil-model --example write_tiny
    PYTHONPATH=/tmp/llama-site python3 tools/reference/make_arch_data.py \
        $CARGO_TARGET_DIR/release/examples/write_tiny model/tests/data/arch-reference.json

For every tiny model family (random weights, all F32, written by Veil's `write_tiny`
example in the family's own GGUF layout), llama.cpp tokenizes a prompt, evaluates it in one
batch, then greedily decodes a few tokens one at a time; the file keeps the ids, every
position's logits and the greedy tokens, with the SHA-256 of the GGUF so that the test can
tell the model it regenerates is the one measured here.
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from llama_cpp import Llama

VARIANTS = ["llama", "llama3", "qwen2", "qwen3", "gemma3"]
PROMPT = "what the node sees, hidden"
GREEDY = 8


def main(write_tiny, out):
    result = {
        "generator": "tools/reference/make_arch_data.py: llama-cpp-python 0.3.36, 1 thread, f32 KV cache",
        "prompt": PROMPT,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as d:
        for v in VARIANTS:
            path = os.path.join(d, f"tiny-{v}.gguf")
            subprocess.run([write_tiny, v, path], check=True)
            sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
            # f32 KV cache (llama.cpp's default is f16, which moves these logits by ~1e-2)
            llm = Llama(model_path=path, n_ctx=128, logits_all=True, n_threads=1, verbose=False,
                        type_k=0, type_v=0)
            ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
            llm.eval(ids)
            logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
            greedy = []
            for _ in range(GREEDY):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                greedy.append(nxt)
                llm.eval([nxt])
            result["models"][v] = {
                "gguf_sha256": sha,
                "ids": ids,
                "logits": [[round(float(x), 4) for x in row] for row in logits],
                "greedy": greedy,
            }
            print(f"{v}: {len(ids)} ids, greedy {greedy}", file=sys.stderr)
    with open(out, "w") as f:
        json.dump(result, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
