#!/usr/bin/env python3
"""Reference data for Veil's fidelity tests, computed outside the project.

Run once (it is not part of the test suite); the output is committed as test data:

    python3 -m venv /tmp/ref && /tmp/ref/bin/pip install numpy gguf llama-cpp-python==0.3.36
    /tmp/ref/bin/python tools/reference/make_fidelity_data.py MODEL.gguf model/tests/data/smollm2-fidelity.json

Two independent references:
* `numpy`: a straightforward forward pass written here with numpy, on weights dequantised by
  the `gguf` package, all arithmetic in float64 on the float32 weights ("exact" f32 model).
* `llama_cpp`: llama.cpp (through llama-cpp-python) token ids and logits; llama.cpp
  quantises activations for its Q4 matrix products, so its logits are only close.
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

RAW_PROMPTS = [
    "The capital of France is",
    "In 1969, Neil Armstrong",
    "def quicksort(arr):\n",
    "Water boils at a temperature of",
]
CHAT_PROMPTS = [
    "What is the largest ocean on Earth?",
    "Write a haiku about autumn leaves.",
    "Explain recursion in one sentence.",
]
TOKENIZER_PROBES = [
    "Hello, world! It's 2026-11-23 and π ≈ 3.14159.",
    "   leading spaces and trailing   ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "CamelCaseIdentifiers_with_underscores and ALLCAPS",
    "Ünïcödé façade — «quotes» and 日本語のテキスト",
    "emoji: 👩‍💻🎉 done",
    "<|im_start|>assistant\nSure!<|im_end|>",
    "numbers 000123 4.5e-10 1,000,000",
    "x = [i**2 for i in range(10)]  # squares",
    "",
]
GEN_TOKENS = 16
SAMPLE_IDS = [0, 1, 2, 17, 198, 1000, 4242, 12345, 30000, 49151]


def field(r, key):
    f = r.fields[key]
    return f.contents()


class NumpyLlama:
    def __init__(self, path):
        r = GGUFReader(path)
        self.n_layers = int(field(r, "llama.block_count"))
        self.d = int(field(r, "llama.embedding_length"))
        self.n_heads = int(field(r, "llama.attention.head_count"))
        self.n_kv = int(field(r, "llama.attention.head_count_kv"))
        self.h = self.d // self.n_heads
        self.base = float(field(r, "llama.rope.freq_base"))
        self.eps = float(field(r, "llama.attention.layer_norm_rms_epsilon"))
        self.w = {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type).astype(np.float32)
            self.w[t.name] = a.reshape([int(x) for x in reversed(t.shape)]).astype(np.float64)

    def rms(self, x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * g

    def rope(self, x, pos):
        # x: [t, heads, h]; adjacent pairs (2j, 2j+1) rotate by pos * base^(-2j/h)
        j = np.arange(self.h // 2)
        theta = self.base ** (-2.0 * j / self.h)
        ang = pos[:, None] * theta[None, :]
        c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def logits(self, ids):
        """Logits [t, vocab] of every position of `ids` (a full causal pass)."""
        w, t = self.w, len(ids)
        x = w["token_embd.weight"][ids]
        pos = np.arange(t, dtype=np.float64)
        mask = np.triu(np.full((t, t), -np.inf), 1)
        r = self.n_heads // self.n_kv
        for i in range(self.n_layers):
            p = f"blk.{i}."
            u = self.rms(x, w[p + "attn_norm.weight"])
            q = (u @ w[p + "attn_q.weight"].T).reshape(t, self.n_heads, self.h)
            k = (u @ w[p + "attn_k.weight"].T).reshape(t, self.n_kv, self.h)
            v = (u @ w[p + "attn_v.weight"].T).reshape(t, self.n_kv, self.h)
            q, k = self.rope(q, pos), self.rope(k, pos)
            out = np.empty((t, self.n_heads, self.h))
            for hd in range(self.n_heads):
                g = hd // r
                sc = q[:, hd, :] @ k[:, g, :].T / np.sqrt(self.h) + mask
                sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
                sc /= sc.sum(axis=-1, keepdims=True)
                out[:, hd, :] = sc @ v[:, g, :]
            x = x + out.reshape(t, self.d) @ w[p + "attn_output.weight"].T
            u = self.rms(x, w[p + "ffn_norm.weight"])
            gate = u @ w[p + "ffn_gate.weight"].T
            up = u @ w[p + "ffn_up.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
        head = w.get("output.weight", w["token_embd.weight"])
        return self.rms(x, w["output_norm.weight"]) @ head.T


def top(row, k):
    idx = np.argsort(-row, kind="stable")[:k]
    return [{"id": int(i), "logit": round(float(row[i]), 5)} for i in idx]


def main(model_path, out_path):
    from llama_cpp import Llama

    llm = Llama(model_path=model_path, n_ctx=512, logits_all=True, n_threads=2, verbose=False)
    tmpl = field(GGUFReader(model_path), "tokenizer.chat_template")
    ref = NumpyLlama(model_path)

    def chat(prompt):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(tmpl).render(
            messages=[{"role": "user", "content": prompt}], add_generation_prompt=True
        )

    cases = []
    for kind, prompts in (("raw", RAW_PROMPTS), ("chat", CHAT_PROMPTS)):
        for prompt in prompts:
            text = prompt if kind == "raw" else chat(prompt)
            ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            # numpy greedy continuation, recomputing the whole sequence each step
            seq = list(ids)
            steps = []
            for _ in range(GEN_TOKENS):
                row = ref.logits(seq)[-1]
                nxt = int(np.argmax(row))
                steps.append({"top": top(row, 10),
                              "sampled": [{"id": i, "logit": round(float(row[i]), 5)} for i in SAMPLE_IDS]})
                seq.append(nxt)
                if nxt == 2:
                    break
            numpy_ids = seq[len(ids):]
            # llama.cpp greedy continuation and per-position top-1
            llm.reset()
            llm.eval(ids)
            lseq = list(ids)
            for _ in range(GEN_TOKENS):
                nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                lseq.append(nxt)
                if nxt == 2:
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
                "llama_cpp_top1_logit": [round(float(np.max(s)), 4) for s in scores],
            })
            print(f"{kind:4} {prompt!r}: numpy {len(numpy_ids)} tokens, llama.cpp {len(lseq) - len(ids)}",
                  file=sys.stderr)
    probes = [{"text": t, "special": True, "ids": llm.tokenize(t.encode(), add_bos=False, special=True)}
              for t in TOKENIZER_PROBES]
    probes += [{"text": t, "special": False, "ids": llm.tokenize(t.encode(), add_bos=False, special=False)}
               for t in TOKENIZER_PROBES if "<|" in t]
    json.dump({
        "generator": "tools/reference/make_fidelity_data.py",
        "note": "numpy: float64 arithmetic on the dequantised float32 weights; "
                "llama_cpp: llama-cpp-python 0.3.36, 2 threads, greedy",
        "cases": cases,
        "tokenizer_probes": probes,
    }, open(out_path, "w"), indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
