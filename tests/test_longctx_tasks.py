"""Synthetic long-context task generators: needle placement, lengths, determinism, scoring."""

from __future__ import annotations

import random

import pytest
from script_loader import load_script

from sglang_psa.longctx_tasks import (
    TASK_KINDS,
    FillerCorpus,
    accuracy,
    as_encoders,
    find_local_text,
    make_task,
    make_tasks,
    normalize_answer,
    score_answer,
)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    texts = find_local_text(max_bytes=400_000)
    assert texts, "expected Python sources on this machine"
    return texts


@pytest.fixture(scope="module")
def tokenizer(texts):
    return load_script("train_small_model").train_tokenizer(texts[:20], vocab_size=512)


@pytest.fixture(scope="module")
def corpus(texts, tokenizer) -> FillerCorpus:
    encode, encode_batch = as_encoders(tokenizer)
    return FillerCorpus(texts, encode=encode, encode_batch=encode_batch)


def test_find_local_text_deterministic():
    a = find_local_text(max_bytes=50_000)
    b = find_local_text(max_bytes=50_000)
    assert a == b and sum(map(len, a)) >= 50_000


@pytest.mark.parametrize("kind", TASK_KINDS)
@pytest.mark.parametrize("target", [2048, 4096])
def test_needles_where_intended_and_length(kind, target, corpus, tokenizer):
    task = make_task(kind, corpus, target, seed=3)
    # Length: never above the target, within 5% below it.
    assert 0.95 * target <= task.n_tokens <= target
    # The prompt tokenizes exactly as the generator's ids (pieces are newline-terminated).
    assert tokenizer.encode(task.prompt, add_special_tokens=False).ids == task.input_ids.tolist()
    assert tokenizer.encode(task.completion, add_special_tokens=False).ids == task.completion_ids.tolist()
    for needle, (s, e), (ts, te) in zip(task.needles, task.needle_spans, task.needle_token_spans):
        assert task.prompt[s:e] == needle
        assert tokenizer.decode(task.input_ids[ts:te].tolist()) == needle
    # Every part of the answer is in a target needle and nowhere in the haystack.
    haystack = task.prompt
    for s, e in sorted(task.needle_spans, reverse=True):
        haystack = haystack[:s] + haystack[e:]
    parts = task.answer.replace(",", " ").split()
    for part in parts:
        assert any(part in task.needles[i] for i in task.target_needles)
        assert part not in haystack[: haystack.rfind("\n")]  # the last line is the question
    assert task.prompt + task.completion == task.prompt + " " + task.answer


def test_depth_is_respected(corpus):
    for depth in (0.0, 0.25, 0.5, 0.9, 1.0):
        task = make_task("passkey", corpus, 4096, seed=1, depth=depth)
        start = task.needle_token_spans[0][0]
        assert abs(start / task.n_tokens - depth) < 0.05


def test_variable_tracking_chain_order(corpus):
    task = make_task("variable_tracking", corpus, 2048, seed=5)
    names = task.answer.split()
    starts = [task.needle_spans[i][0] for i in task.target_needles]
    assert starts == sorted(starts)
    assert f"VAR {names[0]} = {task.meta['values'][0]}\n" in task.prompt
    for a, b in zip(names, names[1:]):
        assert f"VAR {b} = VAR {a}\n" in task.prompt


def test_determinism_by_seed(corpus):
    for kind in TASK_KINDS:
        a = make_task(kind, corpus, 2048, seed=7)
        b = make_task(kind, corpus, 2048, seed=7)
        c = make_task(kind, corpus, 2048, seed=8)
        assert a.prompt == b.prompt and a.answer == b.answer
        assert a.input_ids.tolist() == b.input_ids.tolist()
        assert a.prompt != c.prompt
    rng1, rng2 = random.Random(0), random.Random(0)
    assert (
        make_task("passkey", corpus, 1024, rng=rng1).prompt
        == make_task("passkey", corpus, 1024, rng=rng2).prompt
    )
    tasks = make_tasks("kv_retrieval", corpus, 1024, n=4, seed=0)
    assert len({t.prompt for t in tasks}) == 4


def test_long_target_without_tokenizer(texts):
    corpus = FillerCorpus(texts)
    task = make_task("multi_needle", corpus, 16384, seed=0)
    assert task.input_ids is None
    assert 0.95 * 16384 <= task.n_tokens <= 16384
    assert all(task.prompt[s:e] == n for n, (s, e) in zip(task.needles, task.needle_spans))


def test_small_corpus_wraps():
    corpus = FillerCorpus(["alpha beta gamma\n" * 20], encode=lambda s: list(s.encode()))
    task = make_task("passkey", corpus, 4000, seed=0)
    assert 0.9 * 4000 <= task.n_tokens <= 4000


def test_unknown_kind(corpus):
    with pytest.raises(ValueError):
        make_task("nope", corpus, 1024, seed=0)


def test_scoring():
    assert score_answer(" 12345\nmore text", "12345") == 1.0
    assert score_answer("12345.", "12345") == 1.0
    assert score_answer("  AB  CD ", "AB CD") == 1.0
    assert score_answer("1234", "12345") == 0.0
    assert score_answer("", "12345") == 0.0
    assert score_answer("CD AB", "AB CD") == 0.0
    assert normalize_answer("\n\n") == ""
    assert accuracy(["1", "2"], [type("T", (), {"answer": "1"})(), type("T", (), {"answer": "3"})()]) == 0.5
