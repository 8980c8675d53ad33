"""Probe: does the bundled 0.5B model judge better one query at a time (pointwise)?

    python benchmarks/quality/judge_pointwise_probe.py RUN_DIR

RUN_DIR: a run that `python -m gen.judge --candidates 2` has graded. Asks, one (query,
caption) per request with a one-grade schema, about 40 mined negatives the list judge
graded 2, and 40 of the run's own pairs whose query stands word for word in its caption.
A judge that discriminates gives the two sets different grades (docs/quality.md).
"""
import json
import sys
from pathlib import Path

import polars as pl
from vllm import LLM, SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from gen.engines.vllm import _cpu_defaults
from gen import localmodel

def main():
    _cpu_defaults()
    run = Path(sys.argv[1])
    caps = dict(pl.read_parquet(run / 'captions.parquet', columns=['id', 'text']).iter_rows())
    cand = pl.read_parquet(run / 'candidate_judgements.parquet').filter(pl.col('judge_grade') == 2).sample(40, seed=3)
    own = pl.read_parquet(run / 'judgements.parquet')
    own = own.filter(pl.struct('caption_id', 'query').map_elements(lambda r: r['query'] in caps[r['caption_id']], return_dtype=pl.Boolean)).sample(40, seed=3)
    system = open('prompts/judge.system.j2').read().split('只输出')[0] + '只输出一个 JSON 对象 {"grade": 0|1|2}。'
    schema = {"type": "object", "additionalProperties": False, "required": ["grade"],
              "properties": {"grade": {"type": "integer", "enum": [0, 1, 2]}}}
    llm = LLM(model=str(localmodel.ensure()), enforce_eager=True, max_model_len=2048, enable_prefix_caching=True, seed=0)
    sp = SamplingParams(temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(json=schema))
    def ask(df):
        msgs = [[{"role": "system", "content": system}, {"role": "user", "content": f"描述：{caps[c]}\n查询：{q}\n输出："}] for c, q, _ in df.iter_rows()]
        outs = llm.chat(msgs, sp, use_tqdm=False, chat_template_kwargs={"enable_thinking": False})
        return [json.loads(o.outputs[0].text)["grade"] for o in outs]
    g_cand, g_own = ask(cand), ask(own)
    print("candidates (list judge said 2; BM25 negatives):", {k: g_cand.count(k) for k in (0, 1, 2)})
    print("own pairs whose query stands in the caption:", {k: g_own.count(k) for k in (0, 1, 2)})
    for (c, q, _), g in list(zip(cand.iter_rows(), g_cand))[:12]:
        print(g, q, '|', caps[c][:50])

if __name__ == "__main__":
    main()
