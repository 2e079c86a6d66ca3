"""Prompt token counting (plugins/_tokens.py): the documented estimate and a real local tokenizer."""

from __future__ import annotations

import pytest

from plugins import _tokens
from plugins._tokens import completion_allowance, count_prompt_tokens, estimate_text, lax_count, load_tokenizer, register_tokenizer


def test_estimate_is_utf8_bytes_over_four_rounded_up():
    assert estimate_text("") == 0
    assert estimate_text("abcd") == 1
    assert estimate_text("abcde") == 2
    assert estimate_text("é" * 4) == 2  # 8 bytes


def test_chat_counts_messages_names_and_priming():
    body = {"model": "m", "messages": [
        {"role": "system", "content": "abcdefgh"},              # 3 + 2
        {"role": "user", "name": "bob", "content": [            # 3 + 1 + 1 (name)
            {"type": "text", "text": "abcd"},                   # 1
            {"type": "image_url", "image_url": {"url": "x"}},   # 85
        ]},
    ]}
    assert count_prompt_tokens(body) == (3 + 2) + (3 + 1 + 1 + 1 + 85) + 3


def test_completions_embeddings_and_token_ids():
    assert count_prompt_tokens({"prompt": "abcdefgh"}) == 2
    assert count_prompt_tokens({"prompt": ["abcd", "abcd"]}) == 2
    assert count_prompt_tokens({"prompt": [1, 2, 3, 4, 5]}) == 5
    assert count_prompt_tokens({"input": [[1, 2], [3, 4, 5]]}) == 5
    assert count_prompt_tokens({"input": "abcdabcd"}) == 2
    assert count_prompt_tokens(None) == 0 and count_prompt_tokens([1, 2]) == 0


def test_tools_are_counted_as_json():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    base = count_prompt_tokens({"messages": []})
    assert count_prompt_tokens({"messages": [], "tools": tools}) > base


def test_completion_allowance():
    assert completion_allowance({}, 256) == 256
    assert completion_allowance({"max_tokens": 10}, 256) == 10
    assert completion_allowance({"max_completion_tokens": 7, "max_tokens": 10}, 256) == 7
    assert completion_allowance({"max_tokens": 10, "n": 3}, 256) == 30
    assert completion_allowance({"max_tokens": True}, 256) == 256
    assert completion_allowance({"max_output_tokens": 5}, 256) == 5
    # read as vLLM's pydantic models read them: it generates what these ask for
    assert completion_allowance({"max_tokens": 10.0, "n": "3"}, 256) == 30
    assert completion_allowance({"max_tokens": " 1_000 "}, 256) == 1000
    assert completion_allowance({"max_completion_tokens": "7.0"}, 256) == 7
    assert completion_allowance({"max_tokens": 10.5}, 256) == 256  # refused upstream: no count
    assert completion_allowance({"max_tokens": "ten"}, 256) == 256
    assert completion_allowance({"max_tokens": "-3"}, 256) == 256



@pytest.mark.parametrize("value, count", [
    ("100.00", 100), ("1_000", 1000), (" +5 ", 5), ("10_0.0", 100), (2.0**62, 2**62), (-0.0, 0), (7, 7),
    ("100.", None), ("1__000", None), ("_100", None), ("0x10", None), ("\u0661\u0662", None), ("1.0e2", None),
    (1e20, None), (2.0**63, None), (True, None), (None, None), ([1], None),
])
def test_lax_count_reads_what_pydantic_reads(value, count):
    """What vLLM's pydantic models (lax mode, pydantic 2 in the vLLM venv) make of a count, value by value:
    no more (a limiter that read more would refuse what the upstream refuses anyway), no less."""
    assert lax_count(value) == count


@pytest.fixture
def tokenizer_json(tmp_path):
    """A tiny word-level tokenizer built here (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    yield str(path)
    _tokens._registered.clear()


def test_a_real_tokenizer_counts_exactly(tokenizer_json):
    body = {"model": "tiny-llm", "messages": [{"role": "user", "content": "hello world hello zzzzzzzzzzzzzzzzzzzzzzzz"}]}
    estimate = count_prompt_tokens(body)
    exact = count_prompt_tokens(body, tokenizers={"tiny-*": tokenizer_json})
    assert exact == 3 + 4 + 3
    assert exact != estimate
    assert count_prompt_tokens(body, tokenizer=load_tokenizer(tokenizer_json)) == exact
    assert count_prompt_tokens(body, tokenizers={"other-*": tokenizer_json}) == estimate
    register_tokenizer("tiny-*", tokenizer_json)
    assert count_prompt_tokens(body) == exact


def test_a_missing_tokenizer_file_fails_at_configuration(tmp_path):
    with pytest.raises(Exception):
        register_tokenizer("x-*", str(tmp_path / "nope.json"))
