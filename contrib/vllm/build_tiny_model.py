#!/usr/bin/env python3
"""Build a tiny random-weight Llama that a CPU vLLM can serve, offline, in seconds.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on text
generated from a seeded word list, and the weights are a seeded random init.
The output directory is a regular Hugging Face model folder (``config.json``,
``model.safetensors``, ``tokenizer.json`` with a ChatML chat template) that
``vllm.entrypoints.openai.api_server --model DIR`` loads with
``HF_HUB_OFFLINE=1``.

The text it generates is gibberish, but deterministic at temperature 0, which
is all the end-to-end tests need: they assert structure, never content.

Usage::

    python contrib/vllm/build_tiny_model.py OUT_DIR [--seed 0] [--force]

Needs ``torch``, ``transformers`` and ``tokenizers`` (present in the venv made
by ``setup_env.sh``). Re-running with the same arguments is a no-op.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

# Bump when the recipe changes so cached models are rebuilt rather than reused.
RECIPE_VERSION = 2

# vLLM's CPU attention backend accepts head sizes of 32 and up only.
HIDDEN_SIZE = 128
NUM_HEADS = 4
NUM_KV_HEADS = 2
NUM_LAYERS = 2
INTERMEDIATE_SIZE = 256
VOCAB_SIZE = 1024
MAX_POSITIONS = 4096

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the template Qwen and many fine-tunes use; the generation prompt
# opens an assistant turn so the model's output is the reply.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to in on for with by from at as is are was be this that it and or not but "
    "model token stream request proxy sluice route plugin cache limit budget usage cost trace "
    "metric server client upstream answer question hello world say write tell list count one "
    "two three four five six seven eight nine ten red green blue quick brown fox jumps over lazy "
    "dog please thanks json data system user assistant tool call function value key name time"
).split()


def corpus(seed: int, lines: int = 4000) -> list[str]:
    """Seeded pseudo-sentences plus digits and punctuation so every common byte pair appears."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        n = rng.randint(3, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if i % 5 == 0:
            words.insert(rng.randrange(n), str(rng.randint(0, 10_000)))
        sentence = " ".join(words)
        out.append(sentence[0].upper() + sentence[1:] + rng.choice(".?!,;:"))
    return out


def build_tokenizer(seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols, so any input (emoji, other scripts) tokenizes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(out: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(seed)
    vocab = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HIDDEN_SIZE // NUM_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Untied and with a wide init, greedy decoding wanders over the vocabulary
        # instead of repeating the prompt's last token: streams then carry varied
        # text, so "streamed equals non-streamed" compares something.
        tie_word_embeddings=False,
        initializer_range=0.5,
        torch_dtype="float32",
    )
    assert config.head_dim >= 32, "vLLM's CPU attention needs head_dim >= 32"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Build in a sibling temp dir and rename: a half-written model dir would
    # otherwise look complete to the next run (and to a vLLM starting on it).
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).save_pretrained(tmp)
        (tmp / "sluice-recipe.json").write_text(json.dumps({"recipe": RECIPE_VERSION, "seed": seed}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_current(out: Path, seed: int) -> bool:
    stamp = out / "sluice-recipe.json"
    try:
        return json.loads(stamp.read_text()) == {"recipe": RECIPE_VERSION, "seed": seed}
    except (OSError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="model directory to create")
    p.add_argument("--seed", type=int, default=0, help="seed for the corpus and the weights")
    p.add_argument("--force", action="store_true", help="rebuild even when the directory is current")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.force or not is_current(out, args.seed):
        build(out, args.seed)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
