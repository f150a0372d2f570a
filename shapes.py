"""
The shapes world: synthetic images of 1 to 3 coloured shapes in a 3x3 grid of places, and every text MiniGPT-4's
recipe needs about them, so the whole pipeline can be trained and judged on a laptop (miniature.py).

    python shapes.py --out data/shapes                       # the default sizes (about 20 s)
    python shapes.py --out data/shapes --stage1 20000 --stage2 2000 --test 1000

A scene is a background and up to 3 objects, each {shape, colour, size, place}; shapes and colours differ within
a scene. Everything is a pure function of (split, index): the same command writes the same files. Splits are
disjoint by content: a scene's split is fixed by a hash of its contents (80% train, 10% val, 10% test), so no
test scene (background and objects, jitter aside) ever appears in training. Writes:

    OUT/stage1/00000.tar ...   short captions ("a small red circle and a blue star"), the shard layout of data.py
    OUT/align/                 stage 2 (cc_sbu_align): filter_cap.json + image/ID.jpg; detailed descriptions in
                               three styles, the paper's stage-2 data
    OUT/qa/                    the same layout: short questions with one-word answers (each annotation's
                               "instruction" holds its question), mixed into stage 2 per batch (README)
    OUT/test/eval.json         held-out images: {"questions": [{image, question, answer, type}],
                               "images": [{image, objects, background, caption}]} (eval.py reads both)
"""
import argparse
import hashlib
import io
import json
import os
import random
import sys
import tarfile

from PIL import Image, ImageDraw

SIZE = 168  # pixels; the shapes tower's patches are 56 pixels: one per place (model.py's "shapes" preset)
SHAPES = ["circle", "square", "triangle", "star", "diamond", "cross"]
COLOURS = {"red": (220, 30, 30), "orange": (245, 140, 0), "yellow": (235, 215, 0), "green": (30, 150, 40),
           "blue": (30, 70, 220), "purple": (140, 40, 180), "brown": (120, 70, 20), "black": (20, 20, 20)}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (165, 165, 165), "beige": (235, 222, 190),
               "light blue": (190, 215, 240)}
SIZES = {"small": 13, "large": 22}  # radius in pixels
PLACES = ["top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]
SPLITS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}  # scene hash % 10
NUMBER = {1: "one", 2: "two", 3: "three"}
QUESTION_TYPES = ["colour", "shape", "position", "count", "existence"]
ALIGN_FIRST, QA_FIRST = 10**7, 2 * 10**7  # train-scene indices of align/ and qa/ (stage 1: from 0)


# ------------------------------------------------------------------------------------------------- scenes
def scene_key(scene):
    objs = sorted((o["place"], o["size"], o["colour"], o["shape"]) for o in scene["objects"])
    return scene["background"] + "|" + ";".join(",".join(o) for o in objs)


def split_of(scene):
    return int(hashlib.sha1(scene_key(scene).encode()).hexdigest(), 16) % 10


def random_scene(rng):
    n = rng.randint(1, 3)
    shapes, colours, places = rng.sample(SHAPES, n), rng.sample(list(COLOURS), n), rng.sample(range(9), n)
    objects = [{"shape": s, "colour": c, "size": rng.choice(list(SIZES)), "place": PLACES[p],
                "jitter": (rng.randint(-3, 3), rng.randint(-3, 3))} for s, c, p in zip(shapes, colours, places)]
    return {"background": rng.choice(list(BACKGROUNDS)), "objects": sorted(objects, key=lambda o: PLACES.index(o["place"]))}


def scene(split, index):
    """The index-th scene of a split: deterministic, and drawn again until its content hash falls in the split."""
    rng = random.Random(f"shapes/{split}/{index}")
    while True:
        s = random_scene(rng)
        if split_of(s) in SPLITS[split]:
            return s


# ------------------------------------------------------------------------------------------------- images
def polygon(shape, cx, cy, r):
    """The outline of a shape centred at (cx, cy) with radius r -> [(x, y)] (circle: None, drawn as an ellipse)."""
    import math
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.sin(k * math.pi / 5),
                 cy - (r if k % 2 == 0 else 0.45 * r) * math.cos(k * math.pi / 5)) for k in range(10)]
    if shape == "cross":
        a, w = r, r * 0.36
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w), (cx + w, cy + w),
                (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w)]
    return None


def render(scene, size=SIZE):
    """A scene -> PIL RGB image (drawn at 2x and downsampled: smooth edges)."""
    big, cell = size * 2, size * 2 / 3
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene["background"]])
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        row, col = divmod(PLACES.index(o["place"]), 3)
        cx, cy = (col + 0.5) * cell + 2 * o["jitter"][0], (row + 0.5) * cell + 2 * o["jitter"][1]
        r, fill = 2 * SIZES[o["size"]], COLOURS[o["colour"]]
        pts = polygon(o["shape"], cx, cy, r)
        if pts is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(pts, fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


# -------------------------------------------------------------------------------------------------- texts
def name(o, size=True):
    return f"{o['size'] + ' ' if size else ''}{o['colour']} {o['shape']}"


def a(words):
    return ("an " if words[0] in "aeiou" else "a ") + words


def listing(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def at(place):
    return "in the center" if place == "center" else f"on the {place}" if place in ("left", "right") else f"at the {place}"


def caption(scene, rng):
    """Stage 1: a short caption, objects in random order, sizes sometimes left out."""
    objs = rng.sample(scene["objects"], len(scene["objects"]))
    return listing([a(name(o, rng.random() < 0.6)) for o in objs])


def description(scene, rng):
    """Stage 2: a detailed description naming every object with colour, size and place, and the background."""
    objs, bg, n = scene["objects"], scene["background"], len(scene["objects"])
    count = f"{NUMBER[n]} shape{'s' if n > 1 else ''}"
    style = rng.randrange(3)
    if style == 0:
        body = " ".join(f"There is {a(name(o))} {at(o['place'])}." for o in objs)
        return f"The image shows {count} on a {bg} background. {body}"
    if style == 1:
        return f"On a plain {bg} background there {'are' if n > 1 else 'is'} {count}: " + \
            listing([f"{a(name(o))} {at(o['place'])}" for o in objs]) + "."
    body = " ".join(f"The {o['shape']} is {o['colour']} and {o['size']}, {at(o['place'])}." for o in objs)
    return f"This picture has a {bg} background with {listing([a(name(o, False)) for o in objs])}. {body}"


def question(scene, qtype, rng):
    """One question of a type about a scene -> (question, answer): answers are one word (or a place)."""
    objs = scene["objects"]
    o = rng.choice(objs)
    if qtype == "colour":
        return f"What colour is the {o['shape']}?", o["colour"]
    if qtype == "shape":
        return f"What shape is {at(o['place'])}?", o["shape"]
    if qtype == "position":
        return f"Where is the {o['shape']}?", o["place"]
    if qtype == "count":
        return "How many shapes are there?", NUMBER[len(objs)]
    present = {x["shape"] for x in objs}
    shape = rng.choice(sorted(present) if rng.random() < 0.5 else [s for s in SHAPES if s not in present])
    return f"Is there {a(shape)}?", "yes" if shape in present else "no"


def ground_truth(scene):
    return [{k: o[k] for k in ("shape", "colour", "size", "place")} for o in scene["objects"]]


# ------------------------------------------------------------------------------------------------ writers
def write_stage1(out, n, shard_size=1000):
    """n train scenes -> out/00000.tar, ... (KEY.jpg + KEY.txt each) -> the shard paths."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for start in range(0, n, shard_size):
        path = os.path.join(out, f"{start // shard_size:05d}.tar")
        with tarfile.open(path + ".tmp", "w") as tar:
            for i in range(start, min(n, start + shard_size)):
                s = scene("train", i)
                for ext, blob in (("jpg", jpeg(render(s))), ("txt", caption(s, random.Random(f"cap/{i}")).encode())):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def write_stage2(out, n, qa_share=0.0, first=ALIGN_FIRST, types=QUESTION_TYPES):
    """n train scenes from index `first` (far from stage 1's) -> out/filter_cap.json + out/image/ID.jpg: a
    detailed description each, or for a share of them a question-answer pair (its "instruction" holds the question)."""
    os.makedirs(os.path.join(out, "image"), exist_ok=True)
    anns = []
    for i in range(n):
        s, rng = scene("train", first + i), random.Random(f"align/{first + i}")
        render(s).save(os.path.join(out, "image", f"{i}.jpg"), quality=95)
        if rng.random() < qa_share:
            q, ans = question(s, rng.choice(types), rng)
            anns.append({"image_id": str(i), "caption": ans, "instruction": f"<Img><ImageHere></Img> {q}"})
        else:
            anns.append({"image_id": str(i), "caption": description(s, rng)})
    with open(os.path.join(out, "filter_cap.json"), "w") as f:
        json.dump({"annotations": anns}, f, indent=0)
    return len(anns)


def write_eval(out, n, split="test", types=QUESTION_TYPES):
    """n held-out scenes -> out/images/*.jpg and out/eval.json: one question per image, the types in turn."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    questions, images = [], []
    for i in range(n):
        s, rng = scene(split, i), random.Random(f"eval/{split}/{i}")
        rel = f"images/{i:05d}.jpg"
        render(s).save(os.path.join(out, rel), quality=95)
        qtype = types[i % len(types)]
        q, ans = question(s, qtype, rng)
        questions.append({"image": rel, "question": q, "answer": ans, "type": qtype})
        images.append({"image": rel, "objects": ground_truth(s), "background": s["background"],
                       "caption": caption(s, rng)})
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump({"questions": questions, "images": images}, f, indent=0)
    return questions


def make(out, stage1=6000, stage2=2000, qa=3000, test=500, val=200):
    """The whole dataset (see the module docstring)."""
    shards = write_stage1(os.path.join(out, "stage1"), stage1)
    pairs = write_stage2(os.path.join(out, "align"), stage2)
    write_stage2(os.path.join(out, "qa"), qa, qa_share=1.0, first=QA_FIRST)
    write_eval(os.path.join(out, "test"), test, "test")
    write_eval(os.path.join(out, "val"), val, "val")
    return shards, pairs


def main(argv=None):
    p = argparse.ArgumentParser(description="Make the shapes world's dataset.")
    p.add_argument("--out", default="data/shapes")
    p.add_argument("--stage1", type=int, default=6000, help="stage-1 image-caption pairs (1000 per shard)")
    p.add_argument("--stage2", type=int, default=2000, help="stage-2 detailed descriptions")
    p.add_argument("--qa", type=int, default=3000, help="stage-2 questions (one-word answers)")
    p.add_argument("--test", type=int, default=500, help="held-out images, one question each")
    p.add_argument("--val", type=int, default=200)
    args = p.parse_args(argv)
    for k in ("stage1", "stage2", "qa", "test", "val"):
        if not 1 <= getattr(args, k) <= 10**7:
            p.error(f"--{k} must be between 1 and 10000000")
    try:
        shards, pairs = make(args.out, args.stage1, args.stage2, args.qa, args.test, args.val)
    except OSError as e:
        print(f"error: {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(shards)} stage-1 shards ({args.stage1} pairs), align/ ({pairs} descriptions), "
          f"qa/ ({args.qa} questions), test/eval.json ({args.test}), val/eval.json ({args.val})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
