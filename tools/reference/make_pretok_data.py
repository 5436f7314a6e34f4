#!/usr/bin/env python3
"""Reference data for Veil's pre-tokenizers (Llama 3's `llama-bpe`, Qwen's `qwen2`), from
llama.cpp, computed once outside the project:

    PYTHONPATH=/tmp/llama-site python3 tools/reference/make_pretok_data.py \
        ~/.veil/models/SmolLM2-135M-Instruct.Q4_1.gguf model/tests/data/pretok-reference.json

No real Llama 3 or Qwen file ships in a package here, so the vocabulary and merges are
SmolLM2's, written into a vocabulary-only GGUF under each pre-tokenizer's name: the ids then
depend on how the pre-tokenizer splits the text, which is what the test checks.
"""
import json
import os
import sys
import tempfile

from gguf import GGUFReader, GGUFWriter, TokenType
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fidelity_data import TOKENIZER_PROBES  # noqa: E402

PRES = ["llama-bpe", "qwen2"]
# the fidelity data's probes, and a few that exercise these regexes' own rules
PROBES = TOKENIZER_PROBES + [
    "numbers 000123 4.5e-10 1,000,000 and 12345678901",
    "I'LL SAY IT: DON'T, won't, we've, you'd, they're",
    "line one\n  indented line\n\tand a tab\n",
]


def field(r, key):
    return r.fields[key].contents()


def main(model, out):
    r = GGUFReader(model)
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    merges = field(r, "tokenizer.ggml.merges")
    result = {"generator": "tools/reference/make_pretok_data.py: llama-cpp-python 0.3.36",
              "probes": PROBES, "ids": {}}
    with tempfile.TemporaryDirectory() as d:
        for pre in PRES:
            path = os.path.join(d, f"vocab-{pre}.gguf")
            w = GGUFWriter(path, "llama")
            w.add_context_length(512)
            w.add_embedding_length(64)
            w.add_block_count(1)
            w.add_feed_forward_length(128)
            w.add_head_count(4)
            w.add_layer_norm_rms_eps(1e-5)
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(pre)
            w.add_token_list(tokens)
            w.add_token_types([TokenType(t) for t in types])
            w.add_token_merges(merges)
            w.add_bos_token_id(int(field(r, "tokenizer.ggml.bos_token_id")))
            w.add_eos_token_id(int(field(r, "tokenizer.ggml.eos_token_id")))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            llm = Llama(model_path=path, vocab_only=True, verbose=False)
            result["ids"][pre] = [llm.tokenize(p.encode(), add_bos=False, special=False)
                                  for p in PROBES]
            print(f"{pre}: {result['ids'][pre][6]}", file=sys.stderr)
    with open(out, "w") as f:
        json.dump(result, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
