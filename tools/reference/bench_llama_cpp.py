#!/usr/bin/env python3
"""llama.cpp's speed on the same workload as `veil bench --local` (for the PR notes).

    /tmp/ref/bin/python tools/reference/bench_llama_cpp.py MODEL.gguf [PROMPT_TOKENS GEN_TOKENS RUNS [THREADS]] [--json]

Prompt tokens are the first tokens of a repeated paragraph; decoding is greedy for a fixed
count. Prints prompt and decode tokens/s (median of RUNS after a warm-up) and peak RSS, or
with --json one object with the fields of `veil bench --json` (scripts/bench-vs-llamacpp.sh).
"""
import json
import resource
import statistics
import sys
import time

import numpy as np
from llama_cpp import Llama

TEXT = ("Veil runs language models on machines it does not trust. Each node holds "
        "an encrypted slice of the layers and never sees a token, an activation or a logit in the clear. "
        "The client embeds the prompt, rotates it with a secret key and sends it through the pipeline. ")


def main(path, n_prompt=128, n_gen=64, runs=3, threads=2, as_json=False):
    llm = Llama(model_path=path, n_ctx=max(512, n_prompt + n_gen), n_threads=threads,
                n_threads_batch=threads, n_batch=512, verbose=False)
    unit = llm.tokenize(TEXT.encode(), add_bos=False)
    prompt = (unit * (n_prompt // len(unit) + 1))[:n_prompt]
    pp, dd = [], []
    for run in range(runs + 1):
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        p = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n_gen):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([nxt])
        d = time.perf_counter() - t
        if run:
            pp.append(n_prompt / p)
            dd.append(n_gen / d)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if as_json:
        print(json.dumps({"prompt_tokens_per_s": statistics.median(pp),
                          "decode_tokens_per_s": statistics.median(dd), "peak_rss_mib": rss,
                          "prompt_tokens": n_prompt, "gen_tokens": n_gen, "threads": threads}))
        return
    print(f"llama.cpp  prompt {statistics.median(pp):.1f} tok/s  decode {statistics.median(dd):.1f} tok/s  "
          f"peak RSS {rss:.0f} MiB  ({n_prompt} prompt, {n_gen} decoded, median of {runs})")


if __name__ == "__main__":
    a = [x for x in sys.argv[1:] if x != "--json"]
    main(a[0], *(int(x) for x in a[1:5]), as_json="--json" in sys.argv)
