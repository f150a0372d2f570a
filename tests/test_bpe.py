"""bpe.py: SmolLM2's byte-level BPE vs transformers' tokenizer built from the same GGUF file; round trips;
the unicodedata splitter vs the `regex` package; streaming decode of multi-byte characters."""
import os
import unicodedata

import pytest

from bpe import BPETokenizer, pre_tokenize
from generate import _RowText
from llama import load_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's a dog's life; they'll say we've done it, I'd think.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }  // C\r\n\tx = {'a': [1, 2.5e-3]}",
    "Numbers: 0 7 42 1234567890 3.14159 -273.15 1,000,000 ¾ ² ٣ ४ 二十",
    "Whitespace:  two   three    four\n\n\nthree newlines\t\ttabs \u00a0nbsp \u3000ideographic  \n  trailing   ",
    "Emoji 😀🎉👩‍👩‍👧‍👦 🇫🇷 and accents: café naïve Ångström Straße",
    "多语言: 你好，世界！ こんにちは Привет мир! مرحبا بالعالم שלום עולם हिन्दी ελληνικά 한국어",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|><repo_name>x<file_sep>not<|special|> <|im_end|>done <|im_start|><|im_start|>",
    "",
    " ",
    "\n",
    "a",
    "'s 'S 'll 're'",
]


@pytest.fixture(scope="module")
def tok(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf):
    pytest.importorskip("gguf", reason="transformers needs the gguf package to read GGUF tokenizers")
    from transformers import AutoTokenizer
    folder, name = os.path.split(smollm2_gguf)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_ids_match_transformers(tok, hf_tok, smollm2_gguf):
    """transformers' GGUF loader does not know the pre-tokenizer name `smollm` and falls back to GPT-2's split
    (no digit step): equal ids wherever the digit step changes nothing, and everywhere with our GPT-2 split."""
    from gguf_reader import GGUFFile
    gpt2 = BPETokenizer(dict(GGUFFile(smollm2_gguf).kv, **{"tokenizer.ggml.pre": "gpt2"}))
    for text in CORPUS:
        ref = hf_tok.encode(text, add_special_tokens=False)
        assert gpt2.encode(text) == ref, text
        if pre_tokenize(text) == pre_tokenize(text, digits=False):
            assert tok.encode(text) == ref, text


def test_ids_match_smollm2_digit_splitting(tok, hf_tok):
    """SmolLM2's own tokenizer.json (and llama.cpp's `smollm` pre-tokenizer) split every digit (\\p{N}) first,
    then GPT-2's split: transformers' tokenizer with that Digits step gives our ids on the whole corpus."""
    import copy
    from tokenizers import pre_tokenizers
    ref = copy.deepcopy(hf_tok)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in CORPUS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text


def test_round_trip_and_decode_match(tok, hf_tok):
    for text in CORPUS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=False)


def test_special_tokens_and_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, 2, 49152)
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, tok.encode("user")[0], 2]
    assert tok.encode("hi", bos=True, eos=True) == tok.encode("hi") + [2]  # add_bos_token is false in the file
    assert tok.decode([tok.n_words, -1] + tok.encode("ok")) == "ok"  # out-of-range ids are dropped


def test_splitter_matches_regex_package():
    regex = pytest.importorskip("regex", reason="the regex package (test-only reference) is not installed")
    gpt2 = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\p{White_Space}\p{L}\p{N}]+"
                         r"|\p{White_Space}+(?!\P{White_Space})|\p{White_Space}+")
    # every 3rd code point assigned in both Unicode versions (Python's unicodedata may be older than regex's)
    every = "".join(chr(cp) + " " * (cp % 3) for cp in range(0, 0x30000, 3)
                    if unicodedata.category(chr(cp)) not in ("Cn", "Cs") and not regex.match(r"\p{Cn}", chr(cp)))
    for text in CORPUS + [every]:
        ref = [w for part in regex.split(r"(\p{N})", text) if part for w in gpt2.findall(part)]
        assert pre_tokenize(text) == ref
        assert pre_tokenize(text, digits=False) == gpt2.findall(text)


def test_streaming_never_breaks_multibyte_characters(tok):
    text = "é😀👩‍👧 中文 ∑ 🇫🇷"
    ids = tok.encode(text)
    assert "\ufffd" in tok.decode(ids[:2]) or len(ids) < 3  # a cut character decodes to U+FFFD ...
    deltas = []
    row = _RowText(tok, [], lambda r, d: deltas.append(d), 0)
    for i in ids:
        row.push(i)
    row.stream(final=True)
    assert all("\ufffd" not in d for d in deltas) and "".join(deltas) == text  # ... which streaming holds back


def test_unsupported_tokenizer_is_refused(smollm2_gguf):
    from checkpoint import CheckpointError
    from gguf_reader import GGUFFile
    kv = dict(GGUFFile(smollm2_gguf).kv, **{"tokenizer.ggml.pre": "qwen2"})
    with pytest.raises(CheckpointError, match="pre-tokenizer 'qwen2' is not supported"):
        BPETokenizer(kv)
