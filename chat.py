"""
A multi-turn conversation about images with MiniGPT-4 that keeps the LLM's KV cache across turns: each follow-up
costs only its own tokens instead of re-reading the whole history. sample.py is its command line.
"""
import sys

import torch

import checks

from model import IMAGE, MiniGPT4


class TextModel:
    """The LLM alone, for a chat without images: MiniGPT4's text-side methods over the LLM and its tokenizer."""
    embed, generate, clean_answer, pad_id = MiniGPT4.embed, MiniGPT4.generate, MiniGPT4.clean_answer, MiniGPT4.pad_id

    def __init__(self, cfg, llama_model, tokenizer):
        self.cfg, self.llama_model, self.tokenizer = cfg, llama_model, tokenizer


class Chat:
    """A multi-turn conversation (conversation.py's Chat). Messages: {"role": "user"/"assistant", "text",
    "images", "ids" (the answer tokens)}. The KV cache holds every fed token; a turn feeds only what is new.
    Past the context cap, the oldest turns without an image are dropped and the rest re-prefilled.

    The first turn's context equals the original's. Later turns differ from the original, which rebuilds the
    history string from the CLEANED answers and re-tokenizes it every turn: here an answer stays the tokens
    the model generated (after "Assistant:" / " [/INST] " as prompted), and each text piece between answers
    and images is tokenized on its own (fresh leading "▁"). So: (1) an answer that stopped on "###" keeps the
    "###" tokens it generated as the separator, which is what "answer###" re-tokenizes to in the common case;
    (2) an answer that ended otherwise (eos, which the original also keeps as "</s>" in its text, or
    max_new_tokens) gets the separator as the start of the next piece: "▁###Human: ..." where the original has
    "...answer###Human: ..." inline; (3) the next user piece starts with "▁Human" (original: "Human" glued
    to "###"); (4) Llama-2: the prompt's " [/INST] " ends with a standalone "▁" before the generated answer,
    where the original re-tokenizes " [/INST] answer" as "▁answer"."""

    def __init__(self, model, max_context=None, **opts):
        self.model, self.t = model, model.cfg.chat_template
        self.max_context = min(max_context or model.cfg.max_context, model.llama_model.cfg.max_seq_len)
        self.opts = opts  # generation defaults (MiniGPT4.generate's keywords)
        self.reset()

    def reset(self):
        self.messages, self.cache, self.n_fed, self.last = [], None, 0, None

    def upload_img(self, image):
        """A path / PIL image / pixels (3, H, W) / img_embeds (nq, D): encoded once, kept as embeddings."""
        from data import preprocess
        if not torch.is_tensor(image):
            image = preprocess(image, size=self.model.cfg.vit.img_size)
        if image.dim() == 3 and image.shape[0] == 3:
            w = next(self.model.llama_proj.parameters())
            with torch.no_grad():
                image = self.model.encode_img(image[None].to(w.device, w.dtype))[0][0]  # (nq, D)
        self.messages.append(dict(role="user", text=f"<Img>{IMAGE}</Img>", images=[image], ids=None))

    def ask(self, text):
        text = checks.user_text(text, (IMAGE, *self.model.tokenizer.special))  # never a slot or special token
        last = self.messages[-1] if self.messages else None
        if last and last["role"] == "user" and last["text"].endswith("</Img>"):  # joins the image message
            last["text"] = " ".join([last["text"], text])
        else:
            self.messages.append(dict(role="user", text=text, images=[], ids=None))

    def items(self):
        """The prompt as pieces: str, list of ids (answers) or image embeds (nq, D); adjacent strs merged.
        Before the first answer this is the template's first_turn, the original's prompt."""
        t, out = self.t, [self.t.head]
        for m in self.messages:
            if m["role"] == "user":
                for i, p in enumerate(t.user_turn(m["text"]).split(IMAGE)):
                    out += ([m["images"][i - 1]] if i else []) + [p]
            else:
                out.append(t.open)
                if m["ids"] is not None:  # answered: its tokens, then the separator if it did not produce it
                    out += [list(m["ids"]), t.closing(self.model.tokenizer.decode(m["ids"]))]
        merged = []
        for p in out:
            if isinstance(p, str) and merged and isinstance(merged[-1], str):
                merged[-1] += p
            else:
                merged.append(p)
        return [p for p in merged if not (isinstance(p, str) and p == "")]

    def context_embeds(self):
        """The whole conversation as embeds (1, L, D): text pieces tokenized on their own, bos on the first."""
        parts = []
        for i, p in enumerate(self.items()):
            if isinstance(p, str):
                parts.append(self.model.embed(self.model.tokenizer.encode(p, bos=i == 0)))
            elif isinstance(p, list):
                parts.append(self.model.embed(p))
            else:
                parts.append(p[None].to(parts[0].dtype))
        return torch.cat(parts, dim=1)

    def fit(self, max_new_tokens):
        """Drop the oldest (question, answer) pairs without an image until history + answer fit the cap; if it
        still does not fit, cut the history's start (the original's left cut), keeping at least the newest token."""
        emb = self.context_embeds()
        while emb.shape[1] + max_new_tokens > self.max_context:
            ms = self.messages
            i = next((i for i in range(len(ms) - 2) if ms[i]["role"] == "user" and not ms[i]["images"]), None)
            if i is None:
                break
            n = 2 if ms[i + 1]["role"] == "assistant" else 1  # the question and its answer
            del ms[i:i + n]
            self.cache = None  # the kept prefix changed: re-prefill
            emb = self.context_embeds()
        if emb.shape[1] + max_new_tokens > self.max_context:
            print(f"chat: conversation exceeds {self.max_context} tokens; the model will not see its start",
                  file=sys.stderr)
            keep = max(self.max_context - max_new_tokens, 1)
            emb, self.cache = emb[:, -keep:], None
        return emb

    @torch.no_grad()
    def answer(self, on_text=None, **opts):
        """Generate the assistant's reply (streamed through on_text(delta) if given) -> cleaned answer text."""
        opts = {**self.opts, **opts}
        max_new = opts.setdefault("max_new_tokens", 300)
        if max_new >= self.max_context:
            raise ValueError(f"max_new_tokens {max_new} must be < the context cap {self.max_context} (max_context, "
                             f"at most the LLM's {self.model.llama_model.cfg.max_seq_len}): the answer must fit")
        beams = opts.get("num_beams", 1) > 1
        self.messages.append(dict(role="assistant", text=None, images=[], ids=None))
        emb = self.fit(max_new)
        if self.cache is None or self.cache.pos + emb.shape[1] - self.n_fed + max_new > self.cache.max_len:
            self.cache = None if beams else self.model.llama_model.new_cache(
                1, max(self.max_context, emb.shape[1] + max_new) + 16)
            self.n_fed = 0
        stream = None if on_text is None else (lambda row, delta: on_text(delta))
        gen = self.model.generate(emb[:, self.n_fed:], cache=self.cache, on_text=stream, **opts)
        self.last = gen
        ids = gen.ids[0, :gen.lengths[0]].tolist()
        if beams:  # the beams' cache rows do not hold the winner: re-prefill next turn
            self.cache, self.n_fed = None, 0
        else:  # the cache now holds everything but the last generated token
            self.n_fed = int(self.cache.n_valid()[0])
        self.messages[-1].update(ids=ids, text=self.model.clean_answer(ids))
        return self.messages[-1]["text"]
