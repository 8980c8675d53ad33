"""Baseline: the same local model asked with a plain one-line prompt for a list of queries.

What capgen's prompt, taxonomy and curation have to beat. Same model, sampling and
decoding constraint mechanism (a JSON schema, here just a list of strings); writes pairs
(query, caption_id, type="plain") for `python -m gen.eval finetune --pairs`.

    .venv/bin/python benchmarks/quality/plain_prompt.py --captions CAPTIONS.jsonl --out plain.jsonl
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPT = "为下面这段图片描述写出用户可能用来搜索这张图片的查询词：{text}"
SCHEMA = {"type": "object", "properties": {"queries": {"type": "array", "items": {"type": "string"},
                                                       "maxItems": 20}},
          "required": ["queries"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--captions", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()

    from gen import localmodel
    from gen.config import Sampling
    from gen.engines.vllm import _cpu_defaults

    _cpu_defaults()
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    caps = [json.loads(line) for line in args.captions.open(encoding="utf-8") if line.strip()][: args.limit]
    s = Sampling()  # capgen's defaults: the comparison is about the prompt, not sampling
    llm = LLM(model=str(localmodel.ensure()), enable_prefix_caching=True, max_model_len=2048,
              seed=s.seed, enforce_eager=True)
    params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=512,
                            structured_outputs=StructuredOutputsParams(json=SCHEMA))
    t0 = time.perf_counter()
    outs = llm.chat([[{"role": "user", "content": PROMPT.format(text=c["text"])}] for c in caps], params,
                    chat_template_kwargs={"enable_thinking": False})
    rows, bad, tokens = [], 0, 0
    for c, o in zip(caps, outs):
        tokens += len(o.outputs[0].token_ids)
        try:
            queries = json.loads(o.outputs[0].text)["queries"]
        except (json.JSONDecodeError, KeyError, TypeError):
            bad += 1
            continue
        for q in dict.fromkeys(q.strip() for q in queries if isinstance(q, str) and q.strip()):
            if q != c["text"]:
                rows.append({"query": q, "caption_id": c["id"], "type": "plain"})
    with args.out.open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(json.dumps({"captions": len(caps), "unparsable": bad, "pairs": len(rows),
                      "completion_tokens": tokens, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
