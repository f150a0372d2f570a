"""
The paper's evaluations (section 4), one command each, on any model the project loads. Each writes a JSON
result (--out) and prints a one-screen table; the metrics themselves are in metrics.py.

    python eval.py vqa      --data qa.json      --weights weights/        # AOK-VQA / GQA style accuracy
    python eval.py chair    --data objects.json --vocab coco              # CHAIR_i / CHAIR_s, long vs short
    python eval.py coverage --data captions.json [--judge-url http://host/v1 --judge-model NAME]
    python eval.py advanced --images folder/ --page tasks.html            # the four tasks, for people to judge

Inputs are JSON lists; image paths are relative to the JSON file. vqa: {"image", "question", "answers": [...]
or "answer", "type"?}. chair: {"image", "objects": [...]}. coverage: {"image", "caption"} (a reference
caption). Model options as sample.py (--model, --weights, --vit/--qformer/--llm/--proj; a train.py checkpoint
as --proj brings its Table 5 switches). Answers are greedy.
"""
import argparse
import html
import json
import os
import sys
import urllib.error
import urllib.request

import metrics as M

LONG = "Please describe this image as detailed as possible."  # the paper's two CHAIR prompts
SHORT = "Please describe the image shortly and precisely, in less than 20 words."
ADVANCED = ["Explain why this meme is funny.", "How should I make something like this?",  # section 4.1's tasks
            "Help me draft a professional advertisement for this.", "Can you craft a beautiful poem about this image?"]
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


# ------------------------------------------------------------------------------------------------ model
def load_model(args):
    import torch
    from model import MiniGPT4
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    return MiniGPT4.from_pretrained(args.weights, args.model, args.vit, args.qformer, args.llm, args.proj,
                                    dtype=dtype, device=args.device)


def ask(model, images, questions, max_new_tokens, batch_size=8):
    """One question per image (paths), each a fresh first turn, greedy -> answers."""
    import torch
    from data import preprocess
    p = next(model.llama_proj.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(x, size=model.cfg.vit.img_size) for x in images[i:i + batch_size]])
        with torch.no_grad():
            emb, _ = model.encode_img(pixels.to(p.device, p.dtype))
        out += model.answer(emb, questions[i:i + batch_size], do_sample=False, max_new_tokens=max_new_tokens)
    return out


def read_items(path, keys):
    """A JSON list of objects each holding `keys`; image paths made relative to the file's folder. The shapes
    world's eval.json ({"questions": [...], "images": [...]}) gives its questions (vqa) or images (chair)."""
    try:
        with open(path) as f:
            items = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--data {path}: not a readable JSON file ({e})") from None
    if isinstance(items, dict):  # shapes.py's eval.json
        items = items.get("questions" if "question" in keys else "images")
    if not isinstance(items, list) or not items:
        raise ValueError(f"--data {path}: expected a non-empty JSON list of objects")
    root = os.path.dirname(os.path.abspath(path))
    for n, it in enumerate(items):
        missing = [k for k in keys if not (isinstance(it, dict) and (k in it or (k == "answers" and "answer" in it)))]
        if missing:
            raise ValueError(f"--data {path}: item {n} has no {', '.join(missing)}")
        it["image"] = os.path.join(root, it["image"])
        if not os.path.isfile(it["image"]):
            raise ValueError(f"--data {path}: item {n}: image {it['image']} not found")
    return items


# ---------------------------------------------------------------------------------------------- judges
class LocalJudge:
    """The project's own LLM as the judge (default: the evaluated model's LLM, no image), greedy."""

    def __init__(self, llm, tokenizer, max_new_tokens=8):
        self.llm, self.tok, self.max_new_tokens = llm, tokenizer, max_new_tokens

    def __call__(self, prompt):
        import torch
        from generate import generate
        ids = torch.tensor([self.tok.encode(f"{prompt}\nAnswer:", bos=True)], device=self.llm.model.embed_tokens.weight.device)
        with torch.no_grad():
            g = generate(self.llm, idx=ids, max_new_tokens=self.max_new_tokens, eos_id=self.tok.eos_id)
        return self.tok.decode(g.ids[0, :g.lengths[0]])


class HTTPJudge:
    """Any OpenAI-compatible chat endpoint (urllib only): POST {url}/chat/completions, temperature 0. The key,
    if any, comes from the environment variable named by key_env."""

    def __init__(self, url, model, key_env="OPENAI_API_KEY", timeout=60):
        self.url, self.model, self.timeout = url.rstrip("/") + "/chat/completions", model, timeout
        self.key = os.environ.get(key_env, "")

    def __call__(self, prompt):
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 8,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                reply = json.loads(r.read().decode())
            return reply["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            raise ValueError(f"judge {self.url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ValueError(f"judge {self.url}: unreachable ({getattr(e, 'reason', e)})") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError(f"judge {self.url}: not an OpenAI-style chat completion reply") from None


# ---------------------------------------------------------------------------------------------- commands
def run_vqa(args, model):
    items = read_items(args.data, ["image", "question", "answers"])
    preds = ask(model, [it["image"] for it in items], [it["question"] for it in items], args.max_new_tokens,
                args.batch_size)
    for it, p in zip(items, preds):
        it["prediction"], it["answers"] = p, it.get("answers", it.get("answer"))
        it["score"] = M.vqa_score(p, it["answers"])
    res = M.vqa_accuracy(items)
    rows = [[t, v["n"], v["accuracy"]] for t, v in res["per_type"].items()] + [["all", res["n"], res["accuracy"]]]
    return {**res, "items": items}, M.table(rows, ["type", "n", "accuracy"])


def run_chair(args, model):
    items = read_items(args.data, ["image", "objects"])
    vocab, res, rows = M.load_vocab(args.vocab), {}, []
    for name, prompt in (("long", LONG), ("short", SHORT)):
        caps = ask(model, [it["image"] for it in items], [prompt] * len(items), args.max_new_tokens, args.batch_size)
        truth = [[o if isinstance(o, str) else " ".join(map(str, o.values())) for o in it["objects"]] for it in items]
        r = M.chair(caps, truth, vocab)  # an object as a dict (shapes world: shape, colour, ...): its words
        r["captions"] = caps
        res[name] = r
        rows.append([name, r["n"], r["chair_i"], r["chair_s"], r["avg_len"]])
    return res, M.table(rows, ["prompt", "n", "CHAIR_i", "CHAIR_s", "avg words"])


def make_judge(args, model):
    if args.judge_url:
        return HTTPJudge(args.judge_url, args.judge_model, args.judge_key_env)
    if args.judge_llm:
        from llama import Llama, load_tokenizer
        return LocalJudge(Llama.from_pretrained(args.judge_llm), load_tokenizer(args.judge_llm))
    return LocalJudge(model.llama_model, model.tokenizer)


def run_coverage(args, model):
    items = read_items(args.data, ["image", "caption"])
    judge = make_judge(args, model)
    descs = ask(model, [it["image"] for it in items], [LONG] * len(items), args.max_new_tokens, args.batch_size)
    verdicts = []
    for it, d in zip(items, descs):
        it["description"] = d
        it["judge_reply"] = judge(M.COVERAGE_PROMPT.format(reference=it["caption"], generated=d))
        it["covered"] = M.parse_yes_no(it["judge_reply"])
        verdicts.append(it["covered"])
    res = {**M.coverage(verdicts), "prompt": M.COVERAGE_PROMPT, "items": items}
    return res, M.table([[res["n"], res["success_rate"], res["unparsed"]]], ["n", "success rate", "unparsed"])


def run_advanced(args, model):
    if not os.path.isdir(args.images or ""):
        raise ValueError(f"--images {args.images}: not a folder")
    images = sorted(os.path.join(args.images, f) for f in os.listdir(args.images) if f.lower().endswith(IMAGE_EXT))
    if not images:
        raise ValueError(f"--images {args.images}: no {'/'.join(IMAGE_EXT)} files")
    rows = [{"task": q, "image": im, "answer": a} for q in ADVANCED
            for im, a in zip(images, ask(model, images, [q] * len(images), args.max_new_tokens, args.batch_size))]
    page = args.page or "advanced_tasks.md"
    with open(page, "w") as f:
        f.write(write_page(rows, os.path.dirname(os.path.abspath(page)), page.endswith((".html", ".htm"))))
    counts = [[q, sum(r["task"] == q for r in rows)] for q in ADVANCED]
    return {"page": page, "items": rows}, M.table(counts, ["task", "answers"]) + f"\npage for judging: {page}"


def write_page(rows, page_dir, as_html):
    """Image beside answer, one section per task, and a tally column (empty boxes) for people to judge."""
    rel = lambda p: os.path.relpath(os.path.abspath(p), page_dir)  # noqa: E731
    if as_html:
        out = ["<!doctype html><meta charset='utf-8'><title>MiniGPT-4 advanced tasks</title>"]
        for q in ADVANCED:
            out.append(f"<h2>{html.escape(q)}</h2><table border=1><tr><th>image</th><th>answer</th><th>success?</th></tr>")
            out += [f"<tr><td><img src='{html.escape(rel(r['image']))}' width=224></td>"
                    f"<td>{html.escape(r['answer']).replace(chr(10), '<br>')}</td><td>&#9744;</td></tr>"
                    for r in rows if r["task"] == q]
            out.append("</table>")
        return "\n".join(out) + "\n"
    out = ["# MiniGPT-4: the four advanced tasks\n", "Mark each answer in the tally column; success rate = ticks / rows.\n"]
    for q in ADVANCED:
        out += [f"\n## {q}\n", "| image | answer | success? |", "|---|---|---|"]
        out += [f"| ![]({rel(r['image'])}) | {r['answer'].replace('|', '/').replace(chr(10), '<br>')} | ☐ |"
                for r in rows if r["task"] == q]
    return "\n".join(out) + "\n"


COMMANDS = {"vqa": run_vqa, "chair": run_chair, "coverage": run_coverage, "advanced": run_advanced}


def parse_args(argv=None):
    import torch
    p = argparse.ArgumentParser(description="The paper's evaluations.")
    p.add_argument("command", choices=list(COMMANDS))
    p.add_argument("--data", help="JSON list of items (vqa, chair, coverage)")
    p.add_argument("--images", help="advanced: a folder of images")
    p.add_argument("--page", help="advanced: the page to write (.md or .html), default advanced_tasks.md")
    p.add_argument("--vocab", default="coco", help="chair: coco | shapes | a JSON {category: [synonyms]}")
    p.add_argument("--judge-url", help="coverage: an OpenAI-compatible endpoint (.../v1); default: the model's LLM")
    p.add_argument("--judge-model", default="gpt-3.5-turbo", help="coverage: the endpoint's model name")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="coverage: environment variable holding the key")
    p.add_argument("--judge-llm", help="coverage: an LLM folder to judge with (the project's loading)")
    p.add_argument("--out", help="JSON result (default: eval_<command>.json)")
    p.add_argument("--model", default="vicuna-7b")
    p.add_argument("--weights", default=os.environ.get("MINIGPT4_WEIGHTS", "weights"))
    for part in ("vit", "qformer", "llm", "proj"):
        p.add_argument(f"--{part}", help=f"override the {part} file/folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 10 (vqa), 300 (others)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 10 if args.command == "vqa" else 300
    if args.command != "advanced" and not args.data:
        p.error(f"{args.command} needs --data")
    return args


def evaluate(args, model=None):
    """-> (result dict, table text); also writes args.out. `model`: an already loaded one (tests, ablate.py)."""
    model = model or load_model(args)
    res, text = COMMANDS[args.command](args, model)
    res["model"] = dict(model=args.model, proj=args.proj, ablation=model.ablation)
    with open(args.out or f"eval_{args.command}.json", "w") as f:
        json.dump(res, f, indent=1)
    return res, text


def main(argv=None):
    from checkpoint import CheckpointError
    from data import ImageError
    args = parse_args(argv)
    try:
        print(evaluate(args)[1])
    except (CheckpointError, ImageError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
