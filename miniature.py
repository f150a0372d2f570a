"""
MiniGPT-4 in miniature, in one command: the shapes world's data, the vision tower, stage 1, stage 2, then the
evaluation the README reports (accuracy per question type on held-out images, beside chance and beside the same
questions asked about shuffled images), and five detailed descriptions drawn beside their images.

    python miniature.py                       # everything missing is made; about 25 minutes on 2 CPU cores
    python miniature.py --skip-train          # only the evaluation of OUT/stage2/ckpt.pth

The steps are the README's commands (shapes.py, pretrain_vision.py, train.py --config shapes, eval.py); this file
only runs them in order and writes OUT/results.json, OUT/results.md and OUT/descriptions.png.
"""
import argparse
import json
import os
import random
import sys
import textwrap
import time
from collections import Counter
from types import SimpleNamespace

import eval as E
import pretrain_vision
import shapes as S


def chance(questions):
    """Per type: the accuracy of always giving its most common answer (a blind model's best), and 1 / #answers."""
    out = {}
    for t in S.QUESTION_TYPES:
        answers = [q["answer"] for q in questions if q["type"] == t]
        if answers:
            out[t] = {"majority": Counter(answers).most_common(1)[0][1] / len(answers),
                      "uniform": 1 / len(set(answers))}
    return out


def shuffled(path, out_path, seed=0):
    """The same questions, each about another image of the set (a random derangement) -> out_path (absolute
    image paths). Answers that come from the image fall to chance; answers from the question alone do not."""
    with open(path) as f:
        data = json.load(f)
    qs, root = data["questions"], os.path.dirname(os.path.abspath(path))
    order = list(range(len(qs)))
    random.Random(seed).shuffle(order)
    moved = order[1:] + order[:1]  # each question gets the image of the next one in a random cycle
    items = [dict(q, image=os.path.join(root, qs[j]["image"])) for q, j in zip((qs[i] for i in order), moved)]
    with open(out_path, "w") as f:
        json.dump(items, f)
    return out_path


def vqa(model, data, out, batch_size=16):
    args = SimpleNamespace(command="vqa", data=data, out=out, max_new_tokens=6, batch_size=batch_size,
                           model="shapes", proj=None)
    return E.evaluate(args, model)[0]


def describe(model, images, out_png):
    """Detailed descriptions of held-out images (greedy) and a figure: each image beside its text."""
    import torch
    from PIL import Image, ImageDraw
    from data import preprocess
    with torch.no_grad():
        emb, _ = model.encode_img(torch.stack([preprocess(p, size=model.cfg.vit.img_size) for p in images]))
        texts = model.answer(emb, [E.LONG] * len(images), do_sample=False, max_new_tokens=80)
    W, H = 224 + 520, 224
    fig = Image.new("RGB", (W, H * len(images)), "white")
    draw = ImageDraw.Draw(fig)
    for i, (p, t) in enumerate(zip(images, texts)):
        fig.paste(Image.open(p).convert("RGB").resize((224, 224)), (0, i * H))
        draw.multiline_text((236, i * H + 12), "\n".join(textwrap.wrap(t, 80)), fill="black", spacing=4)
    fig.save(out_png)
    return texts


def table(res):
    rows = ["| question type | n | accuracy | shuffled images | chance (majority answer) | chance (uniform) |",
            "|---|---|---|---|---|---|"]
    for t in S.QUESTION_TYPES:
        a, s, c = res["vqa"]["per_type"].get(t), res["shuffled"]["per_type"].get(t), res["chance"].get(t)
        if a:
            rows.append(f"| {t} | {a['n']} | {a['accuracy']:.3f} | {s['accuracy']:.3f} | {c['majority']:.3f} | "
                        f"{c['uniform']:.3f} |")
    rows.append(f"| all | {res['vqa']['n']} | {res['vqa']['accuracy']:.3f} | {res['shuffled']['accuracy']:.3f} | | |")
    return "\n".join(rows)


def run(out="out/miniature", data="data/shapes", weights="weights/shapes", train_args=(), skip_train=False):
    import torch
    import train as T
    from model import MiniGPT4
    os.makedirs(out, exist_ok=True)
    times = {}
    if not all(os.path.isfile(os.path.join(data, f)) for f in ("test/eval.json", "qa/filter_cap.json")):
        t = time.time()
        S.make(data)
        times["data"] = time.time() - t
    if not os.path.isfile(os.path.join(weights, "blip2_pretrained.pth")):
        t = time.time()
        pretrain_vision.pretrain(weights)
        times["vision tower"] = time.time() - t
    common = ["--config", "shapes", f"--weights={weights}", *train_args]
    stage1 = ["--stage", "1", f"--data={data}/stage1/*.tar", f"--out_dir={out}/stage1", "--overwrite", *common]
    mix = T.CONFIGS["shapes"]["stages"][2]["data"].replace("data/shapes", data)  # descriptions and questions
    stage2 = ["--stage", "2", f"--data={mix}", f"--init={out}/stage1/ckpt.pth", f"--out_dir={out}/stage2",
              "--overwrite", *common]
    if not skip_train:
        for name, argv in (("stage 1", stage1), ("stage 2", stage2)):
            t = time.time()
            print(f"== {name}: python train.py {' '.join(argv)}", flush=True)
            T.train(T.parse_args(argv))
            times[name] = time.time() - t
    model = MiniGPT4.from_pretrained(weights, "shapes", proj=f"{out}/stage2/ckpt.pth", dtype=torch.float32)
    t = time.time()
    test = os.path.join(data, "test", "eval.json")
    with open(test) as f:
        test_data = json.load(f)
    res = {"vqa": vqa(model, test, f"{out}/vqa.json"),
           "shuffled": vqa(model, shuffled(test, f"{out}/shuffled_questions.json"), f"{out}/vqa_shuffled.json"),
           "chance": chance(test_data["questions"])}
    images = [os.path.join(os.path.dirname(test), im["image"]) for im in test_data["images"][:5]]
    res["descriptions"] = [{"image": p, "description": d} for p, d in
                           zip(images, describe(model, images, f"{out}/descriptions.png"))]
    times["evaluation"] = time.time() - t
    res["seconds"] = {k: round(v, 1) for k, v in times.items()}
    res["table"] = table(res)
    with open(f"{out}/results.json", "w") as f:
        json.dump({k: v for k, v in res.items() if k not in ("vqa", "shuffled")} |
                  {"vqa": {k: v for k, v in res["vqa"].items() if k != "items"},
                   "shuffled": {k: v for k, v in res["shuffled"].items() if k != "items"}}, f, indent=1)
    with open(f"{out}/results.md", "w") as f:
        f.write(res["table"] + "\n\n" + "\n".join(f"- {k}: {v:.0f} s" for k, v in res["seconds"].items()) + "\n")
    print(res["table"])
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in res["seconds"].items()))
    for d in res["descriptions"]:
        print(f"{d['image']}: {d['description']}")
    return res


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="The miniature MiniGPT-4, end to end (train.py options after --).")
    p.add_argument("--out", default="out/miniature")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--weights", default="weights/shapes")
    p.add_argument("--skip-train", action="store_true", help="evaluate OUT/stage2/ckpt.pth only")
    args = p.parse_args(argv)
    print(f"threads: {pretrain_vision.pin_threads()}")
    from checkpoint import CheckpointError
    from data import ImageError
    try:
        run(args.out, args.data, args.weights, train_args, args.skip_train)
    except (CheckpointError, ImageError, ValueError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
