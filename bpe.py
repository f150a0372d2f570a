"""Byte-level BPE (GPT-2's scheme, as SmolLM2 uses it) built from a GGUF file's vocabulary and merges, behind
llama.py's Tokenizer interface (encode, decode, bos_id, eos_id, unk_id, pad_id, n_words).

encode: control tokens ("<|im_start|>", ...) are kept whole; the text between them is split by the pre-tokenizer
(SmolLM2's `smollm`: every digit on its own, then GPT-2's regex), each piece's UTF-8 bytes are spelled with
GPT-2's bytes-to-unicode table and merged pair by pair, lowest merge rank first. decode: the reverse, with
invalid UTF-8 (a multi-byte character cut between tokens) as U+FFFD, which generate.py's streaming holds back.

The split regex uses the Unicode classes \\p{L} (letters) and \\p{N} (numbers), which the standard `re` module
lacks. We build them from `unicodedata` once (the categories L* and N*, as character ranges) and run the same
regex with `re`, rather than add the `regex` package as a run-time dependency: the classes are exactly the
categories, `re` runs them at C speed, and tests/test_bpe.py checks the ids against the reference tokenizer
(and the splitter against `regex`). `\\s` is spelled as Unicode's White_Space set, which is what the reference
(Rust's regex) means by it; Python's `\\s` differs on a few control characters (U+001C..U+001F). One limit:
characters newer than Python's Unicode database (3.11: Unicode 14) count as unassigned, not as letters."""
import functools
import itertools
import re
import sys
import unicodedata

import torch


def bytes_to_unicode():
    """GPT-2's table: every byte -> a printable character (printable Latin-1 bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # Unicode White_Space


@functools.lru_cache(maxsize=None)
def unicode_classes():
    """{"L": ..., "N": ...}: `re` character-class bodies, the code points whose general category is L* / N*."""
    out = {"L": [], "N": []}
    runs = itertools.groupby(range(sys.maxunicode + 1), key=lambda cp: unicodedata.category(chr(cp))[0])
    for major, run in runs:
        if major in out:
            first = last = next(run)
            for last in run:
                pass
            out[major].append(re.escape(chr(first)) + ("-" + re.escape(chr(last)) if last > first else ""))
    return {k: "".join(v) for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def gpt2_split():
    """GPT-2's pre-tokenizer regex, with \\p{L}, \\p{N} and \\s spelled out for `re`."""
    L, N, S = unicode_classes()["L"], unicode_classes()["N"], WHITE_SPACE
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+")


@functools.lru_cache(maxsize=None)
def digit_split():
    return re.compile(f"([{unicode_classes()['N']}])")


def pre_tokenize(text, digits=True):
    """Text -> pieces: SmolLM2's `smollm` pre-tokenizer (digits=True: each \\p{N} alone first), else GPT-2's."""
    parts = digit_split().split(text) if digits else [text]
    return [w for part in parts if part for w in gpt2_split().findall(part)]


class BPETokenizer:
    """GGUF `tokenizer.ggml.model == "gpt2"` tokenizer. bos=True in encode prepends bos only where the file asks
    for it (`tokenizer.ggml.add_bos_token`; SmolLM2: no, its chat template opens with <|im_start|>)."""

    PRE_TOKENIZERS = {"smollm": True, "gpt2": False, "default": False}  # name -> digits split first

    def __init__(self, kv, path="GGUF file"):
        from checkpoint import CheckpointError
        model, pre = kv.get("tokenizer.ggml.model"), kv.get("tokenizer.ggml.pre", "default")
        if model != "gpt2" or pre not in self.PRE_TOKENIZERS:
            raise CheckpointError(f"{path}: tokenizer {model!r} with pre-tokenizer {pre!r} is not supported "
                                  f"(byte-level BPE 'gpt2' with {', '.join(self.PRE_TOKENIZERS)})")
        self.digits = self.PRE_TOKENIZERS[pre]
        self.pieces = kv["tokenizer.ggml.tokens"]
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.ranks = {tuple(m.split(" ")): r for r, m in enumerate(kv["tokenizer.ggml.merges"])}
        types = kv.get("tokenizer.ggml.token_type") or [1] * len(self.pieces)
        self.special = {p: i for i, (p, t) in enumerate(zip(self.pieces, types)) if t == 3}  # CONTROL tokens
        self.special_re = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len, reverse=True)))
                                     + ")") if self.special else None
        self.n_words = len(self.pieces)
        self.bos_id = kv.get("tokenizer.ggml.bos_token_id", -1)
        self.eos_id = kv.get("tokenizer.ggml.eos_token_id", -1)
        self.unk_id = kv.get("tokenizer.ggml.unknown_token_id", -1)
        self.pad_id = kv.get("tokenizer.ggml.padding_token_id", self.eos_id)
        self.add_bos = kv.get("tokenizer.ggml.add_bos_token", False)
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self.piece_bytes = [p.encode("utf-8") if p in self.special or not set(p) <= self.char_byte.keys()
                            else bytes(self.char_byte[c] for c in p) for p in self.pieces]
        self.bpe = functools.lru_cache(maxsize=65536)(self._bpe)

    def piece_to_id(self, piece):
        return self.ids[piece]

    @classmethod
    def from_gguf(cls, path):
        from gguf_reader import GGUFFile
        return cls(GGUFFile(path).kv, path)

    def _bpe(self, word):
        """One pre-token spelled in the byte alphabet -> ids, merging the lowest-ranked adjacent pair first."""
        parts = list(word)
        while len(parts) > 1:
            pairs = [(self.ranks.get(p, 1 << 62), i) for i, p in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 62:
                break
            a, b = parts[i], parts[i + 1]
            merged, j = [], 0
            while j < len(parts):  # every occurrence of the pair, left to right
                if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        return [self.ids[p] for p in parts]

    def encode(self, text, bos=False, eos=False):
        ids = [self.bos_id] if bos and self.add_bos else []
        for seg in self.special_re.split(text) if self.special_re else [text]:
            if seg in self.special:
                ids.append(self.special[seg])
                continue
            for piece in pre_tokenize(seg, self.digits):
                ids += self.bpe("".join(self.byte_char[b] for b in piece.encode("utf-8")))
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        """ids -> text; control tokens as their text; a cut multi-byte character -> U+FFFD."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return b"".join(self.piece_bytes[i] for i in ids if 0 <= i < self.n_words).decode("utf-8", errors="replace")
