#!/usr/bin/env python3
"""Reference data for Veil's Gemma 3 tests, computed outside the project.

Run once (it is not part of the test suite); the output is committed as test data:

    pip install --target /tmp/llama-site llama-cpp-python==0.3.36 numpy gguf==0.19.0
    PYTHONPATH=/tmp/llama-site python3 tools/reference/make_gemma3_data.py \
        ~/.veil/models/gemma-3-270m-q4_k_m.gguf model/tests/data/gemma3-fidelity.json

Two independent references, as for SmolLM2 (make_fidelity_data.py):
* `numpy`: a Gemma 3 forward pass written here from the model's description (scaled
  embeddings, per-head query/key norms, norms before and after attention and the MLP,
  GELU-gated MLP, sliding-window attention with a RoPE base of 10000 on five layers of six,
  neox RoPE), float64 arithmetic on the weights the `gguf` package dequantizes;
* `llama_cpp`: llama.cpp's token ids and greedy continuations (it quantizes activations for
  its quantized products and uses a float16 table for GELU, so its logits are only close).

The file carries no chat template; chat prompts are rendered with Gemma's format, the same
template Veil builds in (`model/src/chat.rs`), by jinja2.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from make_fidelity_data import field, top

RAW_PROMPTS = [
    "The capital of France is",
    "In 1969, Neil Armstrong",
    "def quicksort(arr):\n",
]
CHAT_PROMPTS = [
    "What is the largest ocean on Earth?",
    "Write a haiku about autumn leaves.",
]
TOKENIZER_PROBES = [
    "Hello, world! It's 2026-11-23 and π ≈ 3.14159.",
    "   leading spaces and trailing   ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "CamelCaseIdentifiers_with_underscores and ALLCAPS",
    "Ünïcödé façade — «quotes» and 日本語のテキスト",
    "emoji: 👩‍💻🎉 done",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after a control token<eos>",
    "numbers 000123 4.5e-10 1,000,000",
    "x = [i**2 for i in range(10)]  # squares",
    "    indented code\n        deeper\n",
    "a\u00a0non-breaking space and a zero\u200bwidth one",
    "",
]
GEN_TOKENS = 16
STOP = {1, 106}  # <eos>, <end_of_turn>
GEMMA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}"
    "{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


class NumpyGemma3:
    def __init__(self, path):
        r = GGUFReader(path)
        a = "gemma3."
        self.n_layers = int(field(r, a + "block_count"))
        self.d = int(field(r, a + "embedding_length"))
        self.n_heads = int(field(r, a + "attention.head_count"))
        self.n_kv = int(field(r, a + "attention.head_count_kv"))
        self.h = int(field(r, a + "attention.key_length"))
        self.base = float(field(r, a + "rope.freq_base"))
        self.local_base = 10000.0
        self.window = int(field(r, a + "attention.sliding_window"))
        self.eps = float(field(r, a + "attention.layer_norm_rms_epsilon"))
        self.w = {}
        for t in r.tensors:
            x = dequantize(t.data, t.tensor_type).astype(np.float32)
            self.w[t.name] = x.reshape([int(s) for s in reversed(t.shape)]).astype(np.float64)

    def rms(self, x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * g

    def rope(self, x, pos, base):
        # x: [t, heads, h]; neox pairs (j, j + h/2) rotate by pos * base^(-2j/h)
        half = self.h // 2
        j = np.arange(half)
        ang = pos[:, None] * (base ** (-2.0 * j / self.h))[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., :half], x[..., half:]
        return np.concatenate([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1)

    def gelu(self, x):
        # GELU's tanh approximation, as Gemma's `gelu_pytorch_tanh`
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    def logits(self, ids):
        """Logits [t, vocab] of every position of `ids` (a full causal pass)."""
        w, t = self.w, len(ids)
        x = w["token_embd.weight"][ids] * np.sqrt(np.float32(self.d))
        pos = np.arange(t, dtype=np.float64)
        dist = pos[:, None] - pos[None, :]
        causal = np.where(dist < 0, -np.inf, 0.0)
        local = np.where((dist < 0) | (dist >= self.window), -np.inf, 0.0)
        r = self.n_heads // self.n_kv
        for i in range(self.n_layers):
            p = f"blk.{i}."
            is_global = (i + 1) % 6 == 0
            base, mask = (self.base, causal) if is_global else (self.local_base, local)
            u = self.rms(x, w[p + "attn_norm.weight"])
            q = (u @ w[p + "attn_q.weight"].T).reshape(t, self.n_heads, self.h)
            k = (u @ w[p + "attn_k.weight"].T).reshape(t, self.n_kv, self.h)
            v = (u @ w[p + "attn_v.weight"].T).reshape(t, self.n_kv, self.h)
            q = self.rms(q, w[p + "attn_q_norm.weight"])
            k = self.rms(k, w[p + "attn_k_norm.weight"])
            q, k = self.rope(q, pos, base), self.rope(k, pos, base)
            out = np.empty((t, self.n_heads, self.h))
            for hd in range(self.n_heads):
                g = hd // r
                sc = q[:, hd, :] @ k[:, g, :].T / np.sqrt(self.h) + mask
                sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
                sc /= sc.sum(axis=-1, keepdims=True)
                out[:, hd, :] = sc @ v[:, g, :]
            a = out.reshape(t, self.n_heads * self.h) @ w[p + "attn_output.weight"].T
            x = x + self.rms(a, w[p + "post_attention_norm.weight"])
            u = self.rms(x, w[p + "ffn_norm.weight"])
            gate = u @ w[p + "ffn_gate.weight"].T
            up = u @ w[p + "ffn_up.weight"].T
            m = (self.gelu(gate) * up) @ w[p + "ffn_down.weight"].T
            x = x + self.rms(m, w[p + "post_ffw_norm.weight"])
        head = w.get("output.weight", w["token_embd.weight"])
        return self.rms(x, w["output_norm.weight"]) @ head.T


def main(model_path, out_path):
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from llama_cpp import Llama

    llm = Llama(model_path=model_path, n_ctx=512, logits_all=True, n_threads=2, verbose=False)
    ref = NumpyGemma3(model_path)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tmpl = env.from_string(GEMMA_TEMPLATE)

    cases = []
    for kind, prompts in (("raw", RAW_PROMPTS), ("chat", CHAT_PROMPTS)):
        for prompt in prompts:
            text = prompt if kind == "raw" else tmpl.render(
                messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
            # BOS as llama.cpp adds it (the file asks for it)
            ids = llm.tokenize(text.encode(), add_bos=True, special=True)
            seq = list(ids)
            steps = []
            for _ in range(GEN_TOKENS):
                row = ref.logits(seq)[-1]
                nxt = int(np.argmax(row))
                steps.append({"top": top(row, 10)})
                seq.append(nxt)
                if nxt in STOP:
                    break
            numpy_ids = seq[len(ids):]
            llm.reset()
            llm.eval(ids)
            lseq = list(ids)
            for _ in range(GEN_TOKENS):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                lseq.append(nxt)
                if nxt in STOP:
                    break
                llm.eval([nxt])
            n = llm.n_tokens
            scores = np.array(llm.scores[:n])
            cases.append({
                "name": f"{kind}:{prompt[:24]}",
                "kind": kind,
                "prompt": prompt,
                "text": text,
                "prompt_ids": ids,
                "numpy_greedy_ids": numpy_ids,
                "numpy_steps": steps,
                "llama_cpp_sequence": lseq[:n],
                "llama_cpp_top1": [int(np.argmax(s)) for s in scores],
                "llama_cpp_text": llm.detokenize(lseq[len(ids):]).decode("utf-8", "replace"),
            })
            print(f"{kind:4} {prompt!r}: numpy {numpy_ids}, llama.cpp {lseq[len(ids):]}", file=sys.stderr)
    probes = [{"text": t, "special": s, "ids": llm.tokenize(t.encode(), add_bos=False, special=s)}
              for t in TOKENIZER_PROBES for s in (True, False)]
    json.dump({
        "generator": "tools/reference/make_gemma3_data.py",
        "note": "numpy: float64 arithmetic on the dequantised float32 weights; "
                "llama_cpp: llama-cpp-python 0.3.36, 2 threads, greedy",
        "cases": cases,
        "tokenizer_probes": probes,
    }, open(out_path, "w"), indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
