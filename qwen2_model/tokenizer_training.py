"""Train a tiny Qwen2-style byte-level BPE tokenizer, for tests, benchmarks and the demo.

The real Qwen vocabulary (151k tokens, ~15 MB) is not something a fresh install can download,
so random checkpoints (`qwen2_model/testing.py`) and the one-command demo use a few-hundred-token
tokenizer trained here in well under a second. It has exactly Qwen2's pipeline (NFC, the Qwen2
split regex, byte-level BPE, ByteLevel decoder) and Qwen2's special tokens after the BPE
vocabulary, so everything downstream (ChatML prompts, stop on `<|endoftext|>`, incremental
detokenization of multi-byte text) behaves as with the real one, and transformers loads it too.

Training is deterministic: the same corpus and vocab_size give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, pre_tokenizers, trainers
from tokenizers.models import BPE

from .tokenizer import DEFAULT_CHAT_TEMPLATE, QWEN2_SPECIAL_TOKENS, Qwen2Tokenizer, apply_qwen2_pipeline

__all__ = ["DEFAULT_CORPUS", "train_byte_level_bpe"]

# A few KB of mixed text: English prose, Chinese, Python, JSON/ChatML-ish punctuation, digits,
# emoji and whitespace runs, so the merges cover what tests and the demo feed the model.
DEFAULT_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Once upon a time, there was a small model that wanted to serve many requests at once.",
    "It learned to batch them continuously, to page its cache, and to stream every token.",
    "Hello, world! How are you today? I'm fine, thanks. We'll see what they've done.",
    "Ray Serve runs replicas of deployments; each replica handles requests concurrently.",
    "Tensor parallelism splits the weights of every layer across several devices.",
    "The answer is 42. There are 365 days in a year, 24 hours in a day, 60 minutes in an hour.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 -17 +5 1e-6 0x1F 2024-06-01",
    "Please summarize the following text in one sentence, and answer the question below.",
    "Question: What is the capital of France? Answer: The capital of France is Paris.",
    "你好，世界！今天天气很好。我们一起去公园散步吧。",
    "机器学习是人工智能的一个分支。大型语言模型可以回答问题、写代码和翻译文本。",
    "北京是中国的首都。上海是一个国际化的大城市。谢谢你的帮助！",
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(f\"even: {i}\")\n    else:\n        continue\n",
    "class Cache:\n    def __init__(self, size: int) -> None:\n        self.blocks = [None] * size\n",
    "import torch\nx = torch.randn(2, 3)\ny = x @ x.T  # [2, 2]\nprint(y.shape)\n",
    '{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}',
    '{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}',
    "<tool_call>\n</tool_call>\n<think>\n</think>\nsystem\nuser\nassistant\n",
    "Punctuation: , . ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ = + * & ^ % $ # @ ~ `",
    "Emoji: 😀 🚀 🎉 👍 ❤️ ✨ — café, naïve, résumé, Zürich, São Paulo, Ελληνικά, русский.",
    "Lists:\n- first item\n- second item\n\n1. one\n2. two\n\n\n",
    "    indented line\n\tTabbed line\n        deeper indentation\n",
)

# Passes over the corpus: repeating it gives the frequent pairs clear counts without more text.
_CORPUS_REPEATS = 4


def _corpus_lines(corpus: Iterable[str] | None) -> list[str]:
    lines = list(DEFAULT_CORPUS if corpus is None else corpus)
    return lines * _CORPUS_REPEATS


def _train_bpe(lines: list[str], bpe_vocab_size: int) -> Tokenizer:
    tok = apply_qwen2_pipeline(Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False)))
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=2,
        show_progress=False,
        # All 256 byte symbols up front, so any text encodes (no unknown bytes) even if the
        # corpus never used them.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],  # added after training so they sit at the end, as in Qwen2
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


def train_byte_level_bpe(
    out_dir: str | Path,
    vocab_size: int = 512,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Train a byte-level BPE with Qwen2's pipeline and write a checkpoint-style tokenizer to `out_dir`.

    `vocab_size` counts everything, the three special tokens `<|endoftext|>`, `<|im_start|>`,
    `<|im_end|>` (the last ids) included; it must leave room for the 256 byte symbols. Writes
    tokenizer.json, vocab.json, merges.txt and tokenizer_config.json (ChatML template,
    eos = pad = `<|endoftext|>` as in Qwen2 base models). Returns `out_dir`.
    """
    n_special = len(QWEN2_SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need at least {256 + n_special} (256 bytes + specials)"
        )
    tok = _train_bpe(_corpus_lines(corpus), vocab_size - n_special)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS])

    config = {
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "chat_template": DEFAULT_CHAT_TEMPLATE,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": 32768,
    }
    out = Path(out_dir)
    Qwen2Tokenizer(tok, config).save_pretrained(out)
    return out
