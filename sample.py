"""
Chat with MiniGPT-4 about an image.

    python sample.py --image cat.jpg                       # interactive: /reset, /image PATH, /quit
    python sample.py --image cat.jpg --prompt "What is in this image?" --greedy
    python sample.py --model llama2 --weights weights/ --image cat.jpg

--weights is a folder laid out like the original release (eva_vit_g.pth, blip2_pretrained_flant5xxl.pth,
prerained_minigpt4_7b.pth / pretrained_minigpt4.pth / pretrained_minigpt4_llama2_7b.pth, and the LLM folder
vicuna-7b/, vicuna/ or Llama-2-7b-chat-hf/); --vit/--qformer/--llm/--proj override single files. A test
fixture folder (tests/fixtures/reference/tiny) works too. The answer goes to stdout, logs to stderr.

`Chat` (below) is the original's multi-turn conversation, except that it keeps the LLM's KV cache across
turns: each follow-up costs only its own tokens instead of re-reading the whole history.
"""
import argparse
import os
import sys
import time

import torch

from model import ALIASES, FILES, IMAGE, TEMPLATES, MiniGPT4, MiniGPT4Config

DEFAULT_WEIGHTS = os.environ.get("MINIGPT4_WEIGHTS", "weights")
MODELS = [*FILES["proj"], *ALIASES]  # the presets with release weights, and their aliases


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
        self.model, self.t = model, TEMPLATES[model.cfg.variant]
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
            w = self.model.llama_proj.weight
            with torch.no_grad():
                image = self.model.encode_img(image[None].to(w.device, w.dtype))[0][0]  # (nq, D)
        self.messages.append(dict(role="user", text=f"<Img>{IMAGE}</Img>", images=[image], ids=None))

    def ask(self, text):
        last = self.messages[-1] if self.messages else None
        if last and last["role"] == "user" and last["text"].endswith("</Img>"):  # joins the image message
            last["text"] = " ".join([last["text"], text])
        else:
            self.messages.append(dict(role="user", text=text, images=[], ids=None))

    def items(self):
        """The prompt as pieces: str, list of ids (answers) or image embeds (nq, D); adjacent strs merged.
        Before the first answer this is the template's first_turn, the original's prompt."""
        t, out = self.t, [self.t.system + self.t.sep]
        for m in self.messages:
            if m["role"] == "user":
                for i, p in enumerate(t.user_turn(m["text"]).split(IMAGE)):
                    out += ([m["images"][i - 1]] if i else []) + [p]
            else:
                out.append(t.open)
                if m["ids"] is not None:  # answered: its tokens, then the separator if it did not produce it
                    out += [list(m["ids"]), "" if t.sep in self.model.tokenizer.decode(m["ids"]) else t.sep]
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


# ----------------------------------------------------------------------------------------------- CLI
HELP = "chat: type a question; /image PATH to start over with another image, /reset, /quit"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Chat with MiniGPT-4 about an image.")
    p.add_argument("--image", help="image file (interactive mode: also /image PATH)")
    p.add_argument("--prompt", help="answer this question once and exit (else: interactive chat)")
    p.add_argument("--model", default="vicuna-7b", choices=MODELS, metavar="MODEL",
                   help="vicuna-7b, vicuna-13b, llama2-7b (aliases: " + ", ".join(ALIASES) + ")")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="folder laid out like the original release")
    for part in ("vit", "qformer", "llm", "proj"):
        p.add_argument(f"--{part}", help=f"override the {part} file/folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--quant", choices=["int8", "int4"], help="weight-only quantized LLM (quant.py): low-memory mode")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search: score / length**this")
    p.add_argument("--repetition-penalty", type=float, help="default: 1.0 (Vicuna), 1.05 (Llama-2), as the original")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--max-context", type=int, help="history cap; older turns are dropped (default 2000, as the "
                                                   "original, at most the LLM's context)")
    p.add_argument("--seed", type=int, help="default: a fresh random seed each run (as the original demo)")
    return p.parse_args(argv)


def check_args(args):
    """Every bad option -> one ValueError naming it, before anything slow happens."""
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    for name in ("max_new_tokens", "num_beams", "max_context"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    max_context = args.max_context or MiniGPT4Config.from_name(ALIASES.get(args.model, args.model)).max_context
    if args.max_new_tokens >= max_context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be < --max-context {max_context} "
                         "(the answer must fit in the context with the prompt)")
    if not args.greedy and not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0 when sampling, got {args.temperature} (or use --greedy)")
    if not args.greedy and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("empty prompt: give a question with --prompt")
    if args.prompt is not None and not args.image:
        raise ValueError("--prompt needs --image")


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def run(args):
    from data import ImageError, load_image
    check_args(args)
    image = None
    if args.image:
        image = load_image(args.image)  # a bad image fails before the slow load
    if args.seed is not None:
        torch.manual_seed(args.seed)
    else:
        torch.seed()  # a fresh random seed each run, as the original demo
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    t0 = time.time()
    model = MiniGPT4.from_pretrained(args.weights, args.model, args.vit, args.qformer, args.llm, args.proj,
                                     dtype=dtype, device=args.device, quant=args.quant)
    say(f"loaded {args.model} ({model.cfg.variant}) in {time.time() - t0:.1f}s on {args.device}")
    opts = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=not args.greedy,
                temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                length_penalty=args.length_penalty)
    chat = Chat(model, max_context=args.max_context, **opts)
    if image is not None:
        chat.upload_img(image)  # preprocessed at the model's image size
    if args.prompt is not None:
        chat.ask(args.prompt)
        print(chat.answer(), flush=True)
        return 0
    say(HELP)
    while True:
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd == "/image" and arg.strip():
                path = arg.strip()
            elif cmd == "/reset":
                path = args.image  # start over about the same image (None: no image)
            else:  # an unknown command, or /image without a path: never sent to the model
                say(HELP)
                continue
            image = None
            if path:
                try:  # load first: a bad path keeps the current conversation and image
                    image = load_image(path)
                except (ImageError, OSError, ValueError) as e:
                    say(f"error: {e}")
                    continue
            chat.reset()
            if image is not None:
                chat.upload_img(image)
            args.image = path
            say(f"(new conversation{' about ' + path if path else ''})")
            continue
        chat.ask(line)
        streamed = args.num_beams == 1
        text = chat.answer(on_text=(lambda d: print(d, end="", flush=True)) if streamed else None)
        print("" if streamed else text, flush=True)


def main(argv=None):
    from checkpoint import CheckpointError
    from data import ImageError
    args = parse_args(argv)
    try:
        return run(args)
    except (CheckpointError, ImageError, ValueError, OSError) as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
