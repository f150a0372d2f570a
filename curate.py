"""
Make a stage-2 set (cc_sbu_align) from your own images, as Section 3.2 of the paper made its 3,500 pairs:

    1. generate  the stage-1 model describes each image (PROMPT, in the model's chat template), batched
    2. continue  an answer under 80 tokens gets "Continue" in the same conversation (the KV cache is kept)
    3. fix       a text LLM rewrites each description with the paper's FIX_PROMPT
    4. filter    hard-coded rules drop apologies, repetition, non-English / meaningless text, short results
    5. write     out/filter_cap.json + out/image/ID.jpg (what train.py --stage 2 reads) and out/report.md

    python curate.py --images my_photos/ --out my_align --weights weights/ --proj out/stage1/ckpt.pth
    python curate.py ... --fixer llm_folder/ --fix-template llama2      # another LLM (HF/Meta folder, GGUF) fixes
    python curate.py ... --fixer-url http://127.0.0.1:8000/v1 --fixer-model NAME   # OpenAI-compatible server
    python curate.py ... --fixer none                                   # skip step 3

The default fixer is the MiniGPT-4's own LLM (Vicuna on a GPU), in its chat template. Resumable: every finished
image is one line appended to out/curate_state.jsonl (a torn last line is ignored); a rerun skips what is done.
The final files are written to a temporary name and renamed, so they are never half-written.
"""
import argparse
import html
import json
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from collections import Counter

import torch
import torch.nn as nn

from generate import generate

PROMPT = "Describe this image in detail. Give as many details as possible. Say everything you see."
CONTINUE = "Continue"
MIN_TOKENS = 80  # fewer answer tokens than this -> ask CONTINUE
FIX_PROMPT = ("Fix the error in the given paragraph. Remove any repeating sentences, meaningless characters, not "
              "English sentences, and so on. Remove unnecessary repetition. Rewrite any incomplete sentences. "
              "Return directly the results without explanation. Return directly the input paragraph if it is "
              "already correct without explanation.")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
STATE = "curate_state.jsonl"


# ----------------------------------------------------------------------------- 1 + 2: describe, continue
def count_tokens(tokenizer, text):
    """The answer's length in LLM tokens (no bos)."""
    return len(tokenizer.encode(text))


def needs_continue(n_tokens, min_tokens=MIN_TOKENS):
    return n_tokens < min_tokens


@torch.no_grad()
def describe(model, pixels, min_tokens=MIN_TOKENS, **opts):
    """pixels (B, 3, H, W) -> per image {"first", "second", "text", "tokens"}. All B conversations decode as one
    padded batch (rows stop on their own); the rows whose answer is short then get CONTINUE as their second turn,
    fed on top of the same KV cache (only the new tokens are computed), as sample.Chat does for one conversation."""
    t, tok = template(model), model.tokenizer
    max_new = opts.setdefault("max_new_tokens", 300)
    img, _ = model.encode_img(pixels.to(model.llama_proj.weight.device, model.llama_proj.weight.dtype))  # (B, nq, D)
    rows = [model.splice(t.first_turn(PROMPT), [e])[0] for e in img]  # each (T_b, D)
    emb, mask = pad(rows)
    turn2 = t.sep + t.user_turn(CONTINUE) + t.open  # the most a second turn adds, besides the answer's last token
    need = emb.shape[1] + 2 * max_new + len(tok.encode(turn2)) + 1
    if need > model.llama_model.cfg.max_seq_len:
        raise ValueError(f"--max-new-tokens {max_new}: two answers and the prompt need {need} tokens, more than the "
                         f"LLM's context of {model.llama_model.cfg.max_seq_len}")
    cache = model.llama_model.new_cache(len(rows), need)
    gen = model.generate(emb, mask, cache=cache, **opts)
    out = []
    for b in range(len(rows)):
        ids = gen.ids[b, :gen.lengths[b]].tolist()
        first = model.clean_answer(ids)
        out.append(dict(first=first, second=None, text=first, tokens=count_tokens(tok, first), ids=ids))
    short = [b for b, r in enumerate(out) if needs_continue(r["tokens"], min_tokens)]
    if short:
        cache.reorder(torch.tensor(short, device=cache.k.device))  # keep only the conversations that go on
        new = []
        for b in short:  # the answer's last token (generated, never fed), the separator unless it made one, the turn
            ids = out[b]["ids"]
            piece = closing(t.sep, tok.decode(ids)) + t.user_turn(CONTINUE) + t.open
            new.append(model.embed(ids[-1:] + tok.encode(piece))[0])
        emb2, mask2 = pad(new)
        gen2 = model.generate(emb2, mask2, cache=cache, **opts)
        for i, b in enumerate(short):
            second = model.clean_answer(gen2.ids[i, :gen2.lengths[i]])
            out[b].update(second=second, text=f"{out[b]['first']} {second}".strip())
    for r in out:
        del r["ids"]
    return out


def template(model):
    """The model's chat template (its config's own, else its variant's)."""
    return model.cfg.chat_template


def closing(sep, answer):
    """What must follow an answer before the next turn: nothing if it produced the separator, else the separator
    less the part the answer ends with (ChatML: an answer ending in "<|im_end|>" still needs its "\n")."""
    if sep in answer:
        return ""
    return sep[max([n for n in range(len(sep)) if answer.endswith(sep[:n])], default=0):]


def pad(rows):
    """[(T_b, D)] -> right-padded (B, T, D), mask (B, T) bool."""
    emb = nn.utils.rnn.pad_sequence(rows, batch_first=True)
    mask = nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.bool) for r in rows], True)
    return emb, mask.to(emb.device)


# ------------------------------------------------------------------------------------------------ 3: fix
def fix_message(text):
    return f"{FIX_PROMPT}\n\n{text}"


# A text-only turn per chat format: (prompt with {}, stop string). No system prompt: MiniGPT-4's is about images.
FIX_TEMPLATES = {"vicuna0": ("###Human: {}###Assistant:", "###"),
                 "llama2": ("[INST] {} [/INST]", None),  # bos comes from encode(bos=True)
                 "chatml": ("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>")}  # SmolLM2


class LocalFixer:
    """A LLaMA-family model of this project (llama.Llama + its tokenizer) fixes a batch of texts, greedy."""

    def __init__(self, llm, tokenizer, template="vicuna0", max_new_tokens=400):
        if template not in FIX_TEMPLATES:
            raise ValueError(f"fix template {template!r}: choose one of {', '.join(FIX_TEMPLATES)} (--fix-template)")
        self.llm, self.tok, self.max_new = llm, tokenizer, max_new_tokens
        self.prompt, self.stop = FIX_TEMPLATES[template]

    @torch.no_grad()
    def __call__(self, texts):
        dev = self.llm.model.embed_tokens.weight.device
        ids = [self.tok.encode(self.prompt.format(fix_message(x)), bos=True) for x in texts]
        idx = nn.utils.rnn.pad_sequence([torch.tensor(i) for i in ids], True, self.tok.eos_id).to(dev)  # (B, T)
        mask = nn.utils.rnn.pad_sequence([torch.ones(len(i), dtype=torch.bool) for i in ids], True).to(dev)
        gen = generate(self.llm, idx, mask=mask, max_new_tokens=self.max_new, eos_id=self.tok.eos_id,
                       pad_id=self.tok.eos_id, stop=[self.stop] if self.stop else [], tokenizer=self.tok)
        return [x.strip() for x in gen.texts]


class FixerError(Exception):
    pass


class HTTPFixer:
    """An OpenAI-compatible chat-completions server (POST {url}/chat/completions), one request per text."""

    def __init__(self, url, model="gpt-3.5-turbo", api_key=None, timeout=120):
        self.url, self.model, self.api_key, self.timeout = url.rstrip("/") + "/chat/completions", model, api_key, timeout

    def __call__(self, texts):
        return [self.one(x) for x in texts]

    def one(self, text):
        body = dict(model=self.model, temperature=0, messages=[dict(role="user", content=fix_message(text))])
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                reply = json.loads(r.read().decode("utf-8"))
            content = reply["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            raise FixerError(f"fixer {self.url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise FixerError(f"fixer {self.url}: cannot reach the server ({getattr(e, 'reason', e)})") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise FixerError(f"fixer {self.url}: the reply is not an OpenAI chat completion "
                             "({'choices': [{'message': {'content': ...}}]})") from None
        if not isinstance(content, str):
            raise FixerError(f"fixer {self.url}: the reply's message content is not text")
        return content.strip()


# --------------------------------------------------------------------------------------------- 4: filter
APOLOGY = re.compile(r"\b(i'?m sorry|i am sorry|i apologi[sz]e|my apologies|as an ai\b|i cannot (see|describe))",
                     re.IGNORECASE)
ALLOWED = re.compile(r"[A-Za-z0-9\s.,;:!?'\"()\-%&/’‘“”–—]")  # characters of plain English prose
NGRAM, MAX_REPEATED = 3, 0.15  # word n-grams; the share of n-grams that repeat an earlier one
MAX_ODD_CHARS, MAX_ODD_WORDS = 0.01, 0.1  # non-prose characters; words with no vowel or a capital inside ("xkcd")
MIN_WORDS = 20


def repeated_fraction(text, n=NGRAM):
    """Share of the word n-grams that already occurred earlier in the text (0: no repetition)."""
    words = re.findall(r"[a-z0-9']+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def drop_reason(text, min_words=MIN_WORDS, max_repeated=MAX_REPEATED):
    """None to keep the text, else why it is dropped: too_short, apology, non_english, repetition."""
    words = text.split()
    if len(words) < min_words:
        return "too_short"
    if APOLOGY.search(text):
        return "apology"
    odd = sum(not ALLOWED.match(c) for c in text) / len(text)
    letter_words = [w for w in (re.sub(r"[^A-Za-z]", "", w) for w in words) if len(w) >= 4]
    garbled = sum(not re.search("[aeiouyAEIOUY]", w) or bool(re.search("[a-z][A-Z]", w)) for w in letter_words)
    if "\ufffd" in text or odd > MAX_ODD_CHARS or garbled > MAX_ODD_WORDS * max(len(letter_words), 1):
        return "non_english"
    if repeated_fraction(text) > max_repeated:
        return "repetition"
    return None


# ------------------------------------------------------------------------------------ state and writing
class State:
    """Finished records, one JSON line each ({"step": "settings"|"describe"|"fix", "key", ...}), appended whole and
    fsynced. A line torn by a crash (no newline at the end) is cut away on open; nothing else is ever rewritten."""

    def __init__(self, path):
        self.path, self.done = path, {"settings": {}, "describe": {}, "fix": {}}
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            if data and not data.endswith(b"\n"):  # a torn last line: drop it
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
                data = data[:data.rfind(b"\n") + 1]
            for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
                try:
                    rec = json.loads(line)
                    self.done[rec["step"]][rec["key"]] = rec
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{path}, line {n}: not a curate.py state record (a foreign or damaged file; "
                                     "use another --out)") from None

    def check(self, settings):
        """The first run records its settings; a resume with other settings would mix two runs: refused."""
        old = self.done["settings"].get("run")
        if old is None:
            self.add([dict(step="settings", key="run", **settings)])
        elif {k: v for k, v in old.items() if k not in ("step", "key")} != json.loads(json.dumps(settings)):
            raise ValueError(f"{self.path} was made with other settings ({old}); use another --out, or delete the "
                             "file to start over")

    def add(self, records):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.done[r["step"]][r["key"]] = r


def atomic_write(path, data):
    """str or bytes -> path, through a temporary file and a rename (never a half-written file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_jpeg(src, dst):
    """The image as image/ID.jpg (data.AlignDataset's layout): a JPEG is copied, anything else re-encoded."""
    from data import load_image
    if src.lower().endswith((".jpg", ".jpeg")):
        shutil.copyfile(src, f"{dst}.tmp")
    else:
        load_image(src).save(f"{dst}.tmp", format="JPEG", quality=95)
    os.replace(f"{dst}.tmp", dst)


def list_images(folder):
    """{key (file stem): path} of the images in folder; one error for a missing folder or a repeated stem."""
    if not os.path.isdir(folder):
        raise ValueError(f"--images {folder}: not a folder")
    found = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTS:
            if stem in found:
                raise ValueError(f"--images {folder}: two images named {stem!r} (the key is the file stem)")
            found[stem] = os.path.join(folder, name)
    if not found:
        raise ValueError(f"--images {folder}: no images ({', '.join(IMAGE_EXTS)})")
    return found


# ---------------------------------------------------------------------------------------------- pipeline
def curate(images, out, model, fixer=None, batch_size=8, min_tokens=MIN_TOKENS, min_words=MIN_WORDS,
           max_repeated=MAX_REPEATED, n_samples=10, log=print, **opts):
    """Run (or resume) the five steps on the images folder; write out/. fixer: texts -> texts, or None (skip).
    -> counts {step / drop reason: n}."""
    from data import ImageError, load_image, preprocess
    paths = list_images(images)
    os.makedirs(os.path.join(out, "image"), exist_ok=True)
    state = State(os.path.join(out, STATE))
    state.check(dict(min_tokens=min_tokens, fix=fixer is not None, **opts))
    todo = [k for k in paths if k not in state.done["describe"]]
    log(f"curate: {len(paths)} images, {len(paths) - len(todo)} already described")
    for i in range(0, len(todo), batch_size):
        keys, pixels, records = [], [], []
        for k in todo[i:i + batch_size]:
            try:
                pixels.append(preprocess(load_image(paths[k]), size=model.cfg.vit.img_size))
                keys.append(k)
            except (ImageError, OSError, ValueError) as e:
                records.append(dict(step="describe", key=k, error=str(e)))
        if keys:
            records += [dict(step="describe", key=k, **r)
                        for k, r in zip(keys, describe(model, torch.stack(pixels), min_tokens, **opts))]
        state.add(records)
        log(f"curate: described {min(i + batch_size, len(todo))}/{len(todo)}")
    described = {k: r for k, r in state.done["describe"].items() if k in paths and "error" not in r}
    if fixer is not None:
        todo = [k for k in described if k not in state.done["fix"]]
        for i in range(0, len(todo), batch_size):
            keys = todo[i:i + batch_size]
            state.add([dict(step="fix", key=k, text=x) for k, x in zip(keys, fixer([described[k]["text"] for k in keys]))])
            log(f"curate: fixed {min(i + batch_size, len(todo))}/{len(todo)}")
    final = {k: state.done["fix"][k]["text"] if fixer is not None else r["text"] for k, r in described.items()}
    reasons = {k: drop_reason(x, min_words, max_repeated) for k, x in final.items()}
    kept = [k for k in paths if k in reasons and reasons[k] is None]
    for k in kept:
        save_jpeg(paths[k], os.path.join(out, "image", f"{k}.jpg"))
    anns = [dict(image_id=k, caption=final[k]) for k in kept]
    atomic_write(os.path.join(out, "filter_cap.json"), json.dumps({"annotations": anns}, indent=1, ensure_ascii=False))
    counts = Counter(images=len(paths), unreadable=len(paths) - len(described), described=len(described),
                     continued=sum(r["second"] is not None for r in described.values()),
                     fixed=len(described) if fixer is not None else 0, kept=len(kept))
    counts.update(f"dropped_{r}" for r in reasons.values() if r)
    atomic_write(os.path.join(out, "report.md"), report(counts, described, final, reasons, n_samples))
    log("curate: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return dict(counts)


def report(counts, described, final, reasons, n_samples):
    """The Markdown report for the manual review the paper did: counts, then before/after pairs."""
    esc = lambda s: html.escape(s or "").replace("|", "&#124;").replace("\n", " ")  # noqa: E731
    lines = ["# Stage-2 curation report", "", "| step / outcome | images |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    lines += ["", f"## Sample of before / after ({min(n_samples, len(final))} of {len(final)})", "",
              "| image | generated (+ continued) | fixed | verdict |", "| --- | --- | --- | --- |"]
    for k in list(final)[:n_samples]:
        r = described[k]
        before = esc(r["first"]) + ("" if r["second"] is None else f" <b>[Continue]</b> {esc(r['second'])}")
        lines.append(f"| `{k}` | {before} | "
                     f"{esc(final[k])} | {reasons[k] or 'kept'} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    from sample import DEFAULT_WEIGHTS, MODELS
    p = argparse.ArgumentParser(description="Curate a stage-2 cc_sbu_align set from an image folder (paper 3.2).")
    p.add_argument("--images", required=True, help="folder of images; each file's stem becomes its image_id")
    p.add_argument("--out", required=True, help="output cc_sbu_align folder (also holds the resume state)")
    p.add_argument("--model", default="vicuna-7b", choices=MODELS, metavar="MODEL")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="folder laid out like the original release")
    for part in ("vit", "qformer", "llm", "proj"):
        p.add_argument(f"--{part}", help=f"override the {part} file/folder (--proj: the stage-1 ckpt.pth)")
    p.add_argument("--fixer", default="self", help="'self' (the MiniGPT-4's LLM), an LLM folder / file, or 'none'")
    p.add_argument("--fix-template", choices=list(FIX_TEMPLATES), help="the fixer's chat format (default: the "
                   "MiniGPT-4 variant's; --fixer FOLDER: vicuna0)")
    p.add_argument("--fixer-url", help="OpenAI-compatible server base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--fixer-model", default="gpt-3.5-turbo", help="model name sent to --fixer-url")
    p.add_argument("--fix-max-new-tokens", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--min-tokens", type=int, default=MIN_TOKENS, help="answers shorter than this get 'Continue'")
    p.add_argument("--min-words", type=int, default=MIN_WORDS, help="filter: drop fixed texts shorter than this")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling, as the demo)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: fp16 on GPU, fp32 on CPU")
    args = p.parse_args(argv)
    for name in ("batch_size", "max_new_tokens", "fix_max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None):
    from checkpoint import CheckpointError
    from data import ImageError
    import llama
    from model import MiniGPT4
    try:
        args = parse_args(argv)
        list_images(args.images)  # a bad folder fails before the slow load
        torch.manual_seed(args.seed)
        dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
        model = MiniGPT4.from_pretrained(args.weights, args.model, args.vit, args.qformer, args.llm, args.proj,
                                         dtype=dtype, device=args.device)
        if args.fixer_url:
            fixer = HTTPFixer(args.fixer_url, args.fixer_model, os.environ.get("OPENAI_API_KEY"))
        elif args.fixer == "none":
            fixer = None
        elif args.fixer == "self":
            fixer = LocalFixer(model.llama_model, model.tokenizer, args.fix_template or model.cfg.variant,
                               args.fix_max_new_tokens)
        else:  # an HF/Meta folder or a GGUF file (SmolLM2: --fix-template chatml)
            fixer = LocalFixer(llama.Llama.from_pretrained(args.fixer, dtype, args.device), llama.load_tokenizer(args.fixer),
                               args.fix_template or "vicuna0", args.fix_max_new_tokens)
        curate(args.images, args.out, model, fixer, args.batch_size, args.min_tokens, args.min_words,
               log=lambda m: print(m, file=sys.stderr, flush=True), max_new_tokens=args.max_new_tokens,
               do_sample=not args.greedy, temperature=args.temperature, top_p=args.top_p)
        return 0
    except (CheckpointError, ImageError, FixerError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
