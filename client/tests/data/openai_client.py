#!/usr/bin/env python3
"""The official `openai` package against `veil serve` (run by client/tests/serve.rs).

    python3 openai_client.py BASE_URL MODEL

Exits non-zero with the failing check's message; prints one line per check.
"""
import sys
from concurrent.futures import ThreadPoolExecutor

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base + "/v1", api_key="any-token", max_retries=0, timeout=120)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


ids = [m.id for m in client.models.list().data]
check(model in ids, f"models.list() names {model}: {ids}")

whole = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=10)
text = whole.choices[0].message.content
u = whole.usage
check(isinstance(text, str) and whole.choices[0].message.role == "assistant", "a chat answer")
check(u.total_tokens == u.prompt_tokens + u.completion_tokens and 1 <= u.completion_tokens <= 10,
      f"usage {u}")
check(whole.choices[0].finish_reason in ("stop", "length"), "a finish reason")


def stream_text(messages, **kw):
    pieces, usage, finish = [], None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                max_tokens=10, stream=True, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    return "".join(pieces), usage, finish


streamed, usage, finish = stream_text(MESSAGES, stream_options={"include_usage": True})
check(streamed == text, f"streamed text equals the whole answer: {streamed!r} vs {text!r}")
check(usage is not None and usage.completion_tokens == u.completion_tokens, f"stream usage {usage}")
check(finish == whole.choices[0].finish_reason, "the same finish reason streamed")

short = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                       max_completion_tokens=3)
check(short.usage.completion_tokens <= 3, "max_completion_tokens")

if len(text) >= 6:
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0,
                                         max_tokens=10, stop=[stop])
    check(cut.choices[0].message.content == text[:text.find(stop)]
          and cut.choices[0].finish_reason == "stop", f"stop sequence {stop!r}")

comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5,
                                 temperature=0)
check(isinstance(comp.choices[0].text, str) and comp.usage.completion_tokens <= 5, "completions")

for kw, err, what in [
    ({"messages": []}, openai.BadRequestError, "empty messages"),
    ({"messages": MESSAGES, "n": 2}, openai.BadRequestError, "n = 2"),
    ({"messages": MESSAGES, "temperature": 5}, openai.BadRequestError, "temperature 5"),
]:
    try:
        client.chat.completions.create(model=model, **kw)
        check(False, f"{what} refused")
    except err as e:
        check(e.status_code == 400 and e.body and "message" in e.body, f"{what} refused: {e}")
try:
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    check(False, "an unknown model refused")
except openai.NotFoundError as e:
    check(e.status_code == 404, "an unknown model refused")

prompts = [[{"role": "user", "content": f"Count to {i}."}] for i in range(8)]
alone = [stream_text(p)[0] for p in prompts]
with ThreadPoolExecutor(8) as pool:
    together = list(pool.map(lambda p: stream_text(p)[0], prompts))
check(together == alone, "8 concurrent streams equal their runs alone")
print("all checks passed")
