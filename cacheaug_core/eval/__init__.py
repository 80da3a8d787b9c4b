"""Evaluation: perplexity by ahead position on whole documents (the paper's Table 1), benchmarks with
the coprocessor called once at the end of the prompt (Tables 2, 3, 4 and 8), and an
lm-evaluation-harness `LM`. One module per concern:

    provenance.py   the models under test, what produced a result, strict JSON
    ppl.py          documents, the sink, windows, perplexity by position, the extra-keys control
    scoring.py      log-likelihood of continuations and generation, latents at the end of the prompt
    bench.py        benchmark arms and runners, --limit and --shard
    stats.py        perplexity summaries, paired bootstrap and Wilson intervals, task metrics
    tables.py       markdown tables of a result JSON
    merge.py        one result from the shards of a sharded `eval bench`
    lm.py           `CacheAugLM`, the lm-eval model "cacheaug"
    cli.py          `cacheaug eval ppl | bench | bench-merge`

    cacheaug eval ppl --text data/corpus/heldout/wiki.jsonl --json ppl.json --compare assets/pause --extra-keys match
    cacheaug eval bench --tasks arc_easy,gsm8k --limit 50 --json bench.json --md bench.md

    from cacheaug_core import eval as ev
    wb = ev.load_models(coprocessor="runs/x/final")
    docs = [d.text for d in ev.load_documents("data/corpus/heldout/wiki.jsonl")]
    res = ev.perplexity_by_position(wb.decoder, wb.tokenizer, wb.coprocessor, docs, positions=32,
                                    sink=ev.resolve_sink(wb.tokenizer)["token_id"])
    print(ev.results_table_markdown(res))

    from cacheaug_core.eval import CacheAugLM          # lm-eval (pip install lm-eval): registers "cacheaug"
    python -m cacheaug_core.eval.lm run --model cacheaug --model_args coprocessor=DIR --tasks arc_easy

Protocols, the JSON schema and how to reproduce a run: docs/evaluation.md.
"""

from .bench import (ALL_TASKS, ARM_NAMES, ARMS, COT_SUFFIX, TASK_NAMES, arm_coprocessors, evaluate_generation,
                    evaluate_multiple_choice, parse_limit, parse_shard, run_bench, shard_items, task_type)
from .merge import merge_bench
from .ppl import (DOC_START, Document, check_ppl_settings, document_windows, load_documents, perplexity_by_position,
                  read_documents, resolve_sink, score_documents, sink_keys)
from .provenance import EvalError, clean_json, device_name, git_commit, load_models, provenance, write_json
from .scoring import (GSM8K_STOP, ChoiceScores, cut_at_stop, encode_pair, extract_answer, generate_text, generate_texts,
                      normalize_number, request_batches, score_choices, score_requests)
from .stats import (bootstrap_rel_change, paired_bootstrap_delta, ppl_summary, resample_weights, task_metrics,
                    wilson_interval)
from .tables import PAPER_POSITIONS, results_table_markdown


def __getattr__(name):  # `from cacheaug_core.eval import CacheAugLM` without importing lm_eval eagerly
    if name == "CacheAugLM":
        from .lm import lm_eval_class

        return lm_eval_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
