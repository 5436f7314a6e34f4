#!/usr/bin/env python3
"""llama.cpp's perplexity on a text, computed as `llama-perplexity` does (for `veil perplexity`).

    PYTHONPATH=<llama-cpp-python site> python3 tools/reference/perplexity_llama_cpp.py MODEL.gguf TEXT [CTX]

The text is tokenized whole (BOS first if the model adds one), cut into chunks of CTX
tokens; each chunk is evaluated from an empty cache with its first token replaced by BOS when
the model adds one, and tokens CTX/2+1 .. CTX-1 are scored. Prints JSON:
{"perplexity", "stderr", "chunks", "scored", "text_tokens"}.
"""
import json
import math
import sys

import numpy as np
from llama_cpp import Llama


def main(path, text_path, ctx=512):
    llm = Llama(model_path=path, n_ctx=ctx, n_batch=ctx, n_threads=2, logits_all=True, verbose=False)
    text = open(text_path, encoding="utf-8").read().encode()
    add_bos = llm._model.add_bos_token()
    tokens = llm.tokenize(text, add_bos=add_bos, special=False)
    bos = llm.token_bos()
    first = ctx // 2
    nll = []
    chunks = len(tokens) // ctx
    for c in range(chunks):
        ids = tokens[c * ctx:(c + 1) * ctx]
        if add_bos:
            ids[0] = bos
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:ctx], dtype=np.float64)
        for j in range(first, ctx - 1):
            row = logits[j]
            m = row.max()
            lse = m + math.log(np.exp(row - m).sum())
            nll.append(lse - row[tokens[c * ctx + j + 1]])
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    err = ppl * math.sqrt(nll.var() / (len(nll) - 1))
    print(json.dumps({"perplexity": ppl, "stderr": err, "chunks": chunks, "scored": len(nll),
                      "text_tokens": len(tokens)}))


if __name__ == "__main__":
    a = sys.argv
    main(a[1], a[2], *(int(x) for x in a[3:4]))
