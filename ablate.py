"""
Table 5 in miniature: the four variants of the paper's ablation (MiniGPT-4; without the Q-Former; three
projection layers; the Q-Former finetuned too) trained with the same recipe and budget, then evaluated by
eval.py (VQA accuracy per question type, CHAIR of long and short descriptions), side by side with the paper.

    python ablate.py --stage1 'data/shapes/stage1/*.tar' --stage2 data/shapes/align:1,data/shapes/qa:2 \
        --vqa data/shapes/test/eval.json --chair data/shapes/test/eval.json --vocab shapes --out_dir out/table5 \
        -- --config shapes
    python ablate.py ... -- --config tiny --max_epoch 1     # after `--`: train.py options for both stages

Writes out_dir/<variant>/stage{1,2}/ckpt.pth, <variant>/{vqa,chair}.json, out_dir/table5.json and out_dir/table5.md.
"""
import argparse
import json
import os
import re
import sys
from types import SimpleNamespace

import eval as E
import metrics as M

VARIANTS = {  # name -> train.py switches (model.ablate)
    "MiniGPT-4": [],
    "w/o Q-Former": ["--no_qformer"],
    "+ 3 layers": ["--proj_layers=3"],
    "+ finetune Q-Former": ["--train_qformer"],
}
PAPER = {"MiniGPT-4": (58.2, 32.2), "w/o Q-Former": (56.9, 33.4), "+ 3 layers": (49.3, 31.0),
         "+ finetune Q-Former": (52.1, 28.0)}  # the paper's Table 5: AOK-VQA, GQA accuracy (%)


def train_variant(switches, stage1, stage2, train_args, out):
    """Stage 1 (and stage 2 from it, if given) with these switches -> the last checkpoint and its TrainConfig."""
    import train as T
    cfg1 = T.parse_args(["--stage", "1", f"--data={stage1}", f"--out_dir={out}/stage1", *switches, *train_args])
    T.train(cfg1)
    if not stage2:
        return f"{out}/stage1/ckpt.pth", cfg1
    cfg2 = T.parse_args(["--stage", "2", f"--data={stage2}", f"--init={out}/stage1/ckpt.pth", f"--out_dir={out}/stage2",
                         *switches, *train_args])
    T.train(cfg2)
    return f"{out}/stage2/ckpt.pth", cfg2


def evaluate_variant(ckpt, cfg, args, out):
    """eval.py's vqa and chair on the trained variant (its checkpoint records the switches)."""
    import torch
    from model import MiniGPT4
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = MiniGPT4.from_pretrained(cfg.weights, cfg.model, cfg.vit or None, cfg.qformer or None, cfg.llm or None,
                                     proj=ckpt, device=device, dtype=torch.float32 if device == "cpu" else torch.float16)
    common = dict(model=cfg.model, proj=ckpt, batch_size=args.batch_size, vocab=args.vocab)
    res = {}
    if args.vqa:
        res["vqa"] = E.evaluate(SimpleNamespace(command="vqa", data=args.vqa, out=f"{out}/vqa.json",
                                                max_new_tokens=args.vqa_tokens, **common), model)[0]
    if args.chair:
        res["chair"] = E.evaluate(SimpleNamespace(command="chair", data=args.chair, out=f"{out}/chair.json",
                                                  max_new_tokens=args.chair_tokens, **common), model)[0]
    return res


def summary(results):
    """-> (rows, headers) of the one-screen table: ours beside the paper's."""
    types = sorted({t for r in results.values() for t in r.get("vqa", {}).get("per_type", {})})
    headers = ["variant", "VQA", *types, "CHAIR_i long", "CHAIR_s long", "words long", "CHAIR_i short",
               "CHAIR_s short", "words short", "paper AOK-VQA", "paper GQA"]
    rows = []
    for name, r in results.items():
        v, c = r.get("vqa", {}), r.get("chair", {})
        row = [name, v.get("accuracy", "-"), *(v.get("per_type", {}).get(t, {}).get("accuracy", "-") for t in types)]
        for p in ("long", "short"):
            row += [c[p]["chair_i"], c[p]["chair_s"], c[p]["avg_len"]] if p in c else ["-"] * 3
        rows.append(row + list(PAPER[name]))
    return rows, headers


def markdown(rows, headers):
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                      *("| " + " | ".join(map(fmt, r)) + " |" for r in rows)]) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Table 5 in miniature (train.py options after --).")
    p.add_argument("--stage1", required=True, help="stage-1 shards (train.py --data)")
    p.add_argument("--stage2", help="stage-2 cc_sbu_align folder (optional)")
    p.add_argument("--vqa", help="eval.py vqa --data file")
    p.add_argument("--chair", help="eval.py chair --data file")
    p.add_argument("--vocab", default="coco", help="CHAIR vocabulary: coco | shapes | a JSON file")
    p.add_argument("--variants", default=",".join(VARIANTS), help="a comma list of: " + ", ".join(VARIANTS))
    p.add_argument("--out_dir", default="out/table5")
    p.add_argument("--vqa-tokens", type=int, default=10)
    p.add_argument("--chair-tokens", type=int, default=300)
    p.add_argument("--chair-images", type=int, default=0, help="CHAIR on the first N images of --chair (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    from checkpoint import CheckpointError
    from data import ImageError
    try:
        names = [n.strip() for n in args.variants.split(",")]
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
        if args.chair and args.chair_images > 0:  # long descriptions are slow on a CPU: a subset, written out
            os.makedirs(args.out_dir, exist_ok=True)
            subset = os.path.join(args.out_dir, "chair_images.json")
            with open(subset, "w") as f:  # read_items made the image paths absolute
                json.dump(E.read_items(args.chair, ["image", "objects"])[:args.chair_images], f)
            args.chair = subset
        results = {}
        for name in names:
            out = os.path.join(args.out_dir, re.sub(r"\W+", "_", name).strip("_").lower())  # e.g. w_o_q_former
            print(f"== {name}: train.py {' '.join(VARIANTS[name] + train_args)}", flush=True)
            ckpt, cfg = train_variant(VARIANTS[name], args.stage1, args.stage2, train_args, out)
            results[name] = {"switches": VARIANTS[name], "checkpoint": ckpt, **evaluate_variant(ckpt, cfg, args, out)}
        rows, headers = summary(results)
        with open(os.path.join(args.out_dir, "table5.json"), "w") as f:
            json.dump({"train_args": train_args, "results": results}, f, indent=1)
        with open(os.path.join(args.out_dir, "table5.md"), "w") as f:
            f.write(markdown(rows, headers))
        print(M.table(rows, headers))
    except (CheckpointError, ImageError, ValueError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
