"""
Chat with MiniGPT-4 about an image.

    python sample.py --image cat.jpg                       # interactive: /reset, /image PATH, /quit
    python sample.py --image cat.jpg --prompt "What is in this image?" --greedy
    python sample.py --model llama2 --weights weights/ --image cat.jpg

--weights is a folder laid out like the original release (eva_vit_g.pth, blip2_pretrained_flant5xxl.pth,
prerained_minigpt4_7b.pth / pretrained_minigpt4.pth / pretrained_minigpt4_llama2_7b.pth, and the LLM folder
vicuna-7b/, vicuna/ or Llama-2-7b-chat-hf/); --vit/--qformer/--llm/--proj override single files. A test
fixture folder (tests/fixtures/reference/tiny) works too. The answer goes to stdout, logs to stderr.
Without --image, --prompt (and --model smollm2, which has no vision weights) chat with the LLM alone: only
--llm is loaded (a GGUF file or folder picks the smollm2 preset: SmolLM2-135M-Instruct, ChatML template).

The conversation itself (with its kept KV cache) is chat.py's `Chat`. torch is imported only when work
starts, so --help and option mistakes answer at once. Missing weights: the error ends with the fetch.py
command that downloads them.
"""
import argparse
import os
import sys
import time

import checks

DEFAULT_WEIGHTS = os.environ.get("MINIGPT4_WEIGHTS", "weights")
TEXT_ONLY = {"smollm2": "smollm2"}  # presets without vision weights -> their LLM folder in --weights
MODELS = ["vicuna-7b", "vicuna-13b", "llama2-7b", "llama2", "vicuna", "vicuna7b", "vicuna13b", *TEXT_ONLY, "shapes"]
HELP = ("chat: type a question; Ctrl-C stops an answer (the cut answer and its question are dropped: the next "
        "question continues the conversation before it); /image PATH starts over with another image, /reset, "
        "/help, /quit (or Ctrl-D)")


def __getattr__(name):  # `from sample import Chat` (older code and the tests) without importing torch up front
    if name == "Chat":
        from chat import Chat
        return Chat
    if name == "MiniGPT4":
        from model import MiniGPT4
        return MiniGPT4
    raise AttributeError(name)


class Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default (those that have one)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def parse_args(argv=None):
    p = checks.ArgumentParser(description="Chat with MiniGPT-4 about an image.",  # bad option: one line
                              formatter_class=Defaults)
    p.add_argument("--image", help="image file (interactive mode: also /image PATH)")
    p.add_argument("--prompt", help="answer this question once and exit (else: interactive chat)")
    p.add_argument("--model", choices=MODELS, metavar="MODEL",
                   help="vicuna-7b (default), vicuna-13b, llama2-7b (aliases: " + ", ".join(MODELS[3:7]) + "); "
                        "smollm2 (text only; the default when --llm is a GGUF file or a folder holding one); shapes (the "
                        "miniature: --weights weights/shapes, README)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="folder laid out like the original release "
                                                              "(fetch.py --out; env MINIGPT4_WEIGHTS)")
    for part in ("vit", "qformer", "llm", "proj"):
        p.add_argument(f"--{part}", help=f"override the {part} file/folder")
    p.add_argument("--device", help="default: cuda if available, else cpu")
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
    """Every bad option -> one ValueError naming it, before anything slow happens. Sets args.model and
    args.text_only (no --image with --prompt, or a model without vision weights)."""
    import torch
    from llama import find_gguf
    from model import ALIASES, MiniGPT4Config
    if args.model is None:
        args.model = "smollm2" if args.llm and find_gguf(args.llm) else "vicuna-7b"
    args.text_only = args.model in TEXT_ONLY or (args.prompt is not None and not args.image)
    if args.text_only and args.image:
        raise ValueError(f"--model {args.model} is text only (no vision weights): drop --image")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    checks.device(args.device)  # cpu or an existing cuda[:N], else one line naming --device
    checks.number("--temperature", args.temperature, *((None, None) if args.greedy else (0, 100)), lo_open=True)
    checks.number("--length-penalty", args.length_penalty, -100, 100)
    if args.repetition_penalty is not None:
        checks.number("--repetition-penalty", args.repetition_penalty, 0, 100, lo_open=True)
    if args.seed is not None:
        checks.seed("--seed", args.seed)
    checks.number("--num-beams", args.num_beams, 1, 64, integer=True)  # each beam holds a KV cache
    for name in ("max_new_tokens", "num_beams", "max_context"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    max_context = args.max_context or MiniGPT4Config.from_name(ALIASES.get(args.model, args.model)).max_context
    if args.max_new_tokens >= max_context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} must be < --max-context {max_context} "
                         "(the answer must fit in the context with the prompt)")
    if not args.greedy and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("empty prompt: give a question with --prompt")


def say(msg):
    print(msg, file=sys.stderr, flush=True)


def check_weights(args, preset):
    """Files the user names (--proj out/stage1/ckpt.pth) must exist: never described as downloadable. Missing
    release files: model.py's list, then the fetch.py command that downloads them."""
    from model import MissingWeights, find_weights
    for part in ("vit", "qformer", "llm", "proj"):
        path = getattr(args, part)
        if path and not os.path.exists(path):
            raise ValueError(f"--{part} {path}: no such file or folder")
    try:
        find_weights(args.weights, preset, args.vit, args.qformer, args.llm, args.proj)
    except MissingWeights as e:
        out = "" if args.weights == "weights" else f" --out {args.weights}"
        raise MissingWeights(f"{e}\nfetch them with: python fetch.py --model {preset}{out}") from None


def describe(model):
    """The LLM that was actually loaded, in words: its preset name if its shapes are one, else its size."""
    from llama import LlamaConfig
    c = model.llama_model.cfg
    shape = lambda p: (p.dim, p.n_layers, p.norm_eps)  # noqa: E731
    names = [n for n in ("vicuna-7b", "vicuna-13b", "llama2-7b") if shape(LlamaConfig.from_name(n)) == shape(c)]
    n = sum(p.numel() for p in model.llama_model.parameters())
    size = f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
    return f"{names[0] if names else 'an LLM of no release size'} ({size} parameters, {c.n_layers} layers x {c.dim})"


def read_line():
    """The next question; None to exit (Ctrl-D, or Ctrl-C on an empty line). A terminal gets readline editing
    and history; a pipe is read line by line."""
    if not sys.stdin.isatty():
        sys.stderr.write("> ")
        sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:  # end of input
            sys.stderr.write("\n")
        return line or None
    try:
        import readline  # noqa: F401  (line editing and history for input(); absent on some platforms)
    except ImportError:
        readline = None
    try:
        return input("> ")
    except EOFError:
        print()
        return None
    except KeyboardInterrupt:
        print()
        typed = readline.get_line_buffer() if readline else ""
        return "" if typed.strip() else None  # a half-typed line is cancelled; an empty one exits


def run(args):
    import torch
    from chat import Chat
    from data import ImageError, load_image
    from model import ALIASES, MiniGPT4
    check_args(args)
    preset = ALIASES.get(args.model, args.model)
    image = None
    if args.image:
        image = load_image(args.image)  # a bad image fails before the slow load
    if not args.text_only:
        check_weights(args, preset)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    else:
        torch.seed()  # a fresh random seed each run, as the original demo
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    t0 = time.time()
    opts = dict(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=not args.greedy,
                temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                length_penalty=args.length_penalty)
    if args.text_only:
        model, opts["original"] = load_text_model(args, dtype), False  # no [bos] start: the prompt is text
    else:
        model = MiniGPT4.from_pretrained(args.weights, args.model, args.vit, args.qformer, args.llm, args.proj,
                                         dtype=dtype, device=args.device, quant=args.quant)
    say(f"loaded {describe(model)} as {preset} ({'text only, ' if args.text_only else ''}{model.cfg.variant} "
        f"prompts) in {time.time() - t0:.1f}s on {args.device}")
    chat = Chat(model, max_context=args.max_context, **opts)
    if image is not None:
        chat.upload_img(image)  # preprocessed at the model's image size
    if args.prompt is not None:
        chat.ask(args.prompt)
        print(chat.answer(), flush=True)
        return 0
    say(HELP)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # undecodable bytes reach Chat.ask, which replaces them
    while True:
        line = read_line()
        if line is None or line.strip() == "/quit":
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd == "/image" and args.text_only:
                say("text-only chat: no vision weights loaded")
                continue
            if cmd == "/image" and arg.strip():
                path = arg.strip()
            elif cmd == "/reset":
                path = args.image  # start over about the same image (None: no image)
            else:  # /help, an unknown command, or /image without a path: never sent to the model
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
        saved = [dict(m) for m in chat.messages]  # to drop this exchange if Ctrl-C cuts the answer
        chat.ask(line)
        streamed = args.num_beams == 1
        try:
            text = chat.answer(on_text=(lambda d: print(d, end="", flush=True)) if streamed else None)
        except KeyboardInterrupt:
            chat.messages, chat.cache, chat.n_fed = saved, None, 0  # the next turn re-reads the kept history
            print(flush=True)
            say("(stopped: that answer and its question are dropped)")
            continue
        print("" if streamed else text, flush=True)


def load_text_model(args, dtype):
    """--llm (else the text-only preset's folder in --weights) -> chat.TextModel with the preset's template."""
    from chat import TextModel
    from llama import Llama, load_tokenizer
    from model import ALIASES, FILES, MiniGPT4Config
    preset = ALIASES.get(args.model, args.model)
    path = args.llm or os.path.join(args.weights, TEXT_ONLY.get(preset) or FILES["llm"][preset][0])
    llm = Llama.from_pretrained(path, dtype=dtype, device=args.device, quant=args.quant)
    cfg = MiniGPT4Config.from_name(preset)
    cfg.max_context = min(cfg.max_context, llm.cfg.max_seq_len)
    return TextModel(cfg, llm, load_tokenizer(path))


def main(argv=None):
    args = parse_args(argv)
    from checkpoint import CheckpointError
    from data import ImageError
    try:
        return run(args)
    except (CheckpointError, ImageError, ValueError, OSError) as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
