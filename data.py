"""Data for MiniGPT-4: image preprocessing, the stage-1 shard dataset, the stage-2 cc_sbu_align dataset, the
caption clean-up, and `python data.py pack IMAGES_DIR CAPTIONS OUT_DIR [--shard-size 1000] [--resize 224]`."""
import csv
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

import checks
from shards import braceexpand, expand_shards, read_tar, split_shards  # noqa: F401 (data.* API)

# ----------------------------------------------------------------------------------------------------------
# Images: the original eval processor (`Blip2ImageEvalProcessor`): convert("RGB") -> PIL bicubic resize to
# size x size -> ToTensor -> CLIP mean/std. Decisions, on top of the original:
# - RGBA/LA: alpha dropped, palettes expanded, CMYK converted: exactly what convert("RGB") does.
# - 16-bit gray (modes I;16*, I: 0..65535) -> 8 bits (round(v / 257)); convert would clip above 255 to white.
# - EXIF orientation is ignored (as the original) unless exif=True. Pillow's decompression-bomb limit
#   (PIL.Image.MAX_IMAGE_PIXELS) stays on: a bomb is an ImageError.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_IMAGE_BYTES = 64 * 2**20  # an image file bigger than this is refused unread (as a shard member: shards.py)


class ImageError(Exception):
    """An image that cannot be used; the message names the file."""


def load_image(src, name=None, exif=False):
    """A path, bytes, file object or PIL image -> a fully decoded RGB PIL image, else ImageError naming it."""
    name = name or (os.fspath(src) if isinstance(src, (str, os.PathLike)) else f"<{type(src).__name__}>")
    if isinstance(src, (str, os.PathLike)):  # a regular file of bounded size only (never a FIFO, /dev/zero)
        try:
            src = checks.read_bytes(src, "image", MAX_IMAGE_BYTES)
        except (OSError, ValueError) as e:
            raise ImageError(str(e)) from None
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            if len(src) == 0:
                raise ValueError("empty (0 bytes)")
            src = io.BytesIO(src)
        with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS is an error, not Pillow's warning
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = src if isinstance(src, Image.Image) else Image.open(src)  # checks the decompression-bomb limit
            img.load()  # full decode now: a truncated file fails here, not later
        img = ImageOps.exif_transpose(img) if exif else img
        if img.mode.startswith("I;16") or img.mode == "I":  # 16-bit gray (H, W) 0..65535 -> 8 bits
            img = Image.fromarray(np.clip(np.round(np.asarray(img) / 257.0), 0, 255).astype(np.uint8), "L")
        return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"cannot read image {name}: {e} (limit PIL.Image.MAX_IMAGE_PIXELS)") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... for broken files
        why = "not an image file" if isinstance(e, Image.UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise ImageError(f"cannot read image {name}: {why}") from e


def random_resized_crop_params(width, height, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """(top, left, h, w) with torchvision RandomResizedCrop.get_params' sampling (same draws from the torch RNG
    or `generator`): 10 tries of area x aspect ratio, else a centre crop clamped to the ratio range."""
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = width * height * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    w, h = width, height  # fallback: centre crop, the whole image if its ratio is in range
    if width / height < min(ratio):
        h = int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w = int(round(height * max(ratio)))
    return (height - h) // 2, (width - w) // 2, h, w


def preprocess(src, train=False, size=224, generator=None, exif=False, name=None):
    """Image -> (3, size, size) float32 tensor. train=True: random resized crop (scale 0.5..1, the first
    MiniGPT-4 recipe) from `generator` (a torch.Generator; None = torch's global RNG) instead of the resize."""
    img = load_image(src, name=name, exif=exif)
    if train:
        i, j, h, w = random_resized_crop_params(img.width, img.height, generator=generator)
        img = img.crop((j, i, j + w, i + h))
    img = img.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, size, size)
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


# ----------------------------------------------------------------------------------------------------------
# Captions (the shard lists and tar reading live in shards.py).

def pre_caption(caption, max_words=50):
    """The original stage-1 caption clean-up (BLIP `pre_caption`): lowercase, each of .!"()*#:;~ -> space,
    runs of whitespace -> one space, strip, keep at most max_words words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def shuffle_buffer(items, size, rng):
    """Approximate shuffle with a buffer of `size` items (webdataset-style); size <= 1 keeps the order."""
    buf = []
    for x in items:
        if len(buf) < max(size, 1):
            buf.append(x)
            continue
        j = rng.randrange(len(buf))
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


def _seed(*parts):  # a 63-bit seed from any values, stable across runs and processes
    return random.Random("/".join(map(str, parts))).getrandbits(63)


def _bad(key, error):  # a sample that collate() drops and counts
    return {"image": None, "text": None, "key": key, "error": error}


# ----------------------------------------------------------------------------------------------------------
# Stage 1: image-caption pairs in webdataset tar shards (img2dataset layout: KEY.jpg/.png/.webp + KEY.json
# with "caption" or KEY.txt), as train.py uses them:
#   ds = ShardDataset("laion/{00000..10488}.tar", seed=0)
#   loader = DataLoader(ds, batch_size=64, num_workers=4, collate_fn=collate)   # persistent_workers=False
#   state = None                          # or, resuming: ds.load_state_dict(saved["data"]); state = saved["data"]
#   for epoch in range(start_epoch, epochs):
#       ds.set_epoch(epoch)
#       for batch in loader:              # batch["image"] (B, 3, 224, 224), batch["text"] [B] cleaned captions
#           state = track(state, batch)   # save `state` with the checkpoint (per rank: it differs by rank)
# - Epoch: the shards are shuffled by (seed, epoch) and split over the global workers (split_shards; want
#   #shards >= world_size * num_workers, else idle workers, a warning), then a shuffle buffer: each sample once
#   per epoch, repeatably. Ranks may end an epoch at different batch counts: under DDP run a fixed number of
#   steps per epoch (as the original's iters_per_epoch). Bad samples (image, caption, shard) become
#   {"image": None, "error"} items that `collate` drops and counts: a batch may hold fewer samples, even none.
# - Resume: each sample carries (epoch, worker, position = records its stream has read); track() keeps the
#   last position per stream and whose turn is next. DataLoader workers take turns from worker 0 (skipping
#   finished ones), so after load_state_dict() worker i reads stream (i + next) % num_workers, replaying to
#   its position without decoding: the same batches in order (same world_size, num_workers (checked), batch_size).

def track(state, batch):
    """The data position after `batch` (or a sample), to save with a checkpoint and load_state_dict later."""
    if state is None or state["epoch"] != batch["epoch"]:
        state = {k: batch[k] for k in ("epoch", "world_size", "num_workers")} | {"positions": {}}
    state["positions"][batch["worker"]] = batch["position"]
    state["next"] = (batch["worker"] + 1) % batch["num_workers"]  # the stream whose turn it is
    return state


class ShardDataset(torch.utils.data.IterableDataset):
    """Stage 1 pairs from the tar shards of one dataset (`shards`: a spec for expand_shards)."""

    def __init__(self, shards, seed=0, shuffle=1000, size=224, train=False, max_words=50, rank=None,
                 world_size=None):
        self.shards = expand_shards(shards)
        self.seed, self.shuffle, self.size, self.train, self.max_words = seed, shuffle, size, train, max_words
        self.rank, self.world_size, self.epoch, self.resume = rank, world_size, 0, None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def load_state_dict(self, state):
        """Continue from a track() state: sets the epoch; each stream skips the records it already read."""
        self.epoch, self.resume = state["epoch"], state

    def _records(self, shards):
        for path in shards:
            try:
                for key, rec in read_tar(path):
                    yield f"{path}:{key}", rec
            except (tarfile.TarError, OSError, EOFError) as e:
                yield path, {"error": f"broken shard {path}: {type(e).__name__}: {e}"}

    def _decode(self, key, rec, generator):
        if "error" in rec:
            return _bad(key, rec["error"])
        try:
            caption = json.loads(rec["json"]).get("caption") if "json" in rec else None
        except (ValueError, AttributeError):  # not JSON, or not an object
            caption = None
        if caption is None and "txt" in rec:
            caption = rec["txt"].decode("utf-8", "replace")
        text = pre_caption(caption, self.max_words) if isinstance(caption, str) else ""
        ext = next((e for e in IMAGE_EXTS if e in rec), None)
        if ext is None or not text:
            return _bad(key, f"{key}: no image" if ext is None else f"{key}: no caption")
        try:
            image = preprocess(rec[ext], self.train, self.size, generator, name=f"{key}.{ext}")
        except ImageError as e:
            return _bad(key, str(e))
        return {"image": image, "text": text, "key": key}

    def stream(self, rank=0, world_size=1, worker=0, num_workers=1):
        """The items of stream `worker` in this epoch; deterministic given (seed, epoch, rank, worker)."""
        order = random.Random(_seed(self.seed, self.epoch, "shards")).sample(self.shards, len(self.shards))
        mine = split_shards(order, rank, world_size, worker, num_workers)
        if not mine:
            warnings.warn(f"rank {rank} worker {worker} gets no shard ({len(self.shards)} shards for "
                          f"{world_size * num_workers} workers; want #shards >= world_size * num_workers)")
        records = shuffle_buffer(self._records(mine), self.shuffle,
                                 random.Random(_seed(self.seed, self.epoch, rank, worker)))
        skip, saved = 0, self._saved()
        if saved is not None:
            if (saved["world_size"], saved["num_workers"]) != (world_size, num_workers):
                raise ValueError(f"data state saved with world_size={saved['world_size']}, num_workers="
                                 f"{saved['num_workers']}; now {world_size}, {num_workers}: use the same to resume")
            skip = {int(k): v for k, v in saved["positions"].items()}.get(worker, 0)
        for position, (key, rec) in enumerate(records, 1):
            if position > skip:
                g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, rank, worker, position))
                yield self._decode(key, rec, g) | dict(epoch=self.epoch, world_size=world_size,
                                                       num_workers=num_workers, worker=worker, position=position)

    def _saved(self):  # the resume state if it is for this epoch
        return self.resume if self.resume is not None and self.resume["epoch"] == self.epoch else None

    def __iter__(self):  # rank/world: given, else torch.distributed, else RANK/WORLD_SIZE, else (0, 1)
        rank, world = self.rank, self.world_size
        if rank is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        elif rank is None:
            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        info = torch.utils.data.get_worker_info()
        worker, n = (info.id, info.num_workers) if info else (0, 1)
        first = (self._saved() or {}).get("next", 0)  # resumed: DataLoader worker 0 goes on with that stream
        return self.stream(rank, world or 1, (worker + first) % n, n)


# ----------------------------------------------------------------------------------------------------------
# Stage 2: the cc_sbu_align folder (filter_cap.json {"annotations": [{"image_id", "caption"}]}, image/ID.jpg),
# map-style: AlignDataset(root)[i] -> {"image", "text" (as is, like the original), "instruction", "key"}. One
# instruction per sample (the original: per batch), seeded by (seed, epoch, index), from a list (default
# prompts/alignment.txt; lines without <ImageHere> are ignored); an annotation's own "instruction" (e.g. a
# question, shapes.py) replaces it. Bad samples: {"image": None}.
DEFAULT_INSTRUCTIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts", "alignment.txt")


def load_instructions(src=None):
    """Instructions from a file (one per line) or a list; default the original four alignment prompts."""
    if src is None or isinstance(src, (str, os.PathLike)):
        with checks.open_file(DEFAULT_INSTRUCTIONS if src is None else src, "r", "instructions", 2**24) as f:
            src = f.read().splitlines()
    out = [s.strip() for s in src if "<ImageHere>" in s]
    if not out:
        raise ValueError("no instruction holds the <ImageHere> placeholder")
    return out


class AlignDataset(torch.utils.data.Dataset):
    """Stage 2: cc_sbu_align image-description pairs with one instruction per sample (see above)."""

    def __init__(self, root, instructions=None, seed=0, size=224, train=False):
        path = os.path.join(root, "filter_cap.json")
        try:
            with checks.open_file(path, "r", "annotations", 2**30) as f:
                self.annotations = json.load(f)["annotations"]
            if not (isinstance(self.annotations, list) and all(isinstance(a, dict) for a in self.annotations)):
                raise TypeError("'annotations' is not a list of objects")
            for a in self.annotations:  # every image stays inside root/image/
                checks.inside(os.path.join(root, "image"), f"{a.get('image_id')}.jpg", "image_id")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected {{'annotations': [{{'image_id', 'caption'}}, ...]}} "
                             f"({type(e).__name__}: {e})") from e
        self.root, self.seed, self.size, self.train, self.epoch = root, seed, size, train, 0
        self.instructions = load_instructions(instructions)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.annotations)

    def __getitem__(self, index):
        ann = self.annotations[index]
        key, caption = str(ann.get("image_id")), ann.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            return _bad(key, f"{key}: no caption")
        rng = random.Random(_seed(self.seed, self.epoch, index))
        try:
            g = torch.Generator().manual_seed(rng.getrandbits(63))
            image = preprocess(os.path.join(self.root, "image", f"{key}.jpg"), self.train, self.size, g)
        except ImageError as e:
            return _bad(key, str(e))
        instruction = rng.choice(self.instructions)  # drawn always: the same draws with or without the next line
        return {"image": image, "text": caption, "instruction": ann.get("instruction") or instruction, "key": key}


def collate(samples):
    """Samples -> {"image": (B, 3, H, W) (torch.empty(0) if none), "text": [B], "key": [B], "instruction": [B]
    (stage 2), "skipped": bad samples dropped from this batch, "errors": their messages, and for stage 1
    "epoch", "world_size", "num_workers", "worker", "position" of the last item (for track())}."""
    good = [s for s in samples if s["image"] is not None]
    batch = {"image": torch.stack([s["image"] for s in good]) if good else torch.empty(0),
             "text": [s["text"] for s in good], "key": [s["key"] for s in good],
             "skipped": len(samples) - len(good), "errors": [s["error"] for s in samples if s["image"] is None]}
    if any("instruction" in s for s in good):
        batch["instruction"] = [s["instruction"] for s in good]
    last = samples[-1] if samples else {}
    batch.update({k: last[k] for k in ("epoch", "world_size", "num_workers", "worker", "position") if k in last})
    return batch


# ----------------------------------------------------------------------------------------------------------
# pack: a folder of images + a captions file -> OUT_DIR/00000.tar, 00001.tar, ... in the img2dataset layout.

def read_captions(path):
    """[(file, caption)] from JSON {file: caption}, [{file, caption}], [[file, caption]], or CSV file,caption."""
    try:
        with checks.open_file(path, "r", "captions file", 2**30, "utf-8-sig", newline="") as f:  # BOM dropped
            rows = list(csv.DictReader(f)) if str(path).lower().endswith(".csv") else json.load(f)
        rows = list(rows.items()) if isinstance(rows, dict) else rows  # {"file": "caption"} -> pairs
        pairs = []
        for row in rows:  # {"file": ..., "caption": ...} (also a CSV row) or [file, caption]
            pair = (row["file"], row["caption"]) if isinstance(row, dict) else (row[0], row[1])
            if not (isinstance(pair[0], str) and isinstance(pair[1], str)):
                raise TypeError(f"{pair}: file and caption must be text")
            pairs.append(pair)
        return pairs
    except (OSError, ValueError, csv.Error, KeyError, IndexError, TypeError) as e:  # missing, not JSON, ...
        raise ValueError(f"captions file {path}: expected {{file: caption}}, a list of {{file, caption}} or "
                         f"[file, caption], or a CSV with columns file,caption ({type(e).__name__}: {e})") from e


def pack(images_dir, captions, out_dir, shard_size=1000, resize=None):
    """Write the shards -> (shard paths, written, skipped); an unreadable image or an empty caption is skipped
    (a line on stderr). out_dir must be new or empty: the shards go to a temp folder renamed to out_dir at the
    end, so a failure leaves no mix of old and new shards (and nothing half written)."""
    if not os.path.isdir(images_dir):
        raise ValueError(f"images folder {images_dir} does not exist or is not a folder")
    checks.number("--shard-size", shard_size, 1, 10**7, integer=True)
    if resize is not None:
        checks.number("--resize", resize, 1, 8192, integer=True)
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise ValueError(f"output folder {out_dir} already exists and is not empty: give a new folder")
    pairs = read_captions(captions)
    paths = [checks.inside(images_dir, file, f"captions file {captions}: file") for file, _ in pairs]
    tmp = tempfile.mkdtemp(prefix=".pack-", dir=os.path.dirname(os.path.abspath(out_dir)))
    try:
        n, written, skipped = _pack(pairs, paths, tmp, shard_size, resize)
        if written:
            if os.path.isdir(out_dir):
                os.rmdir(out_dir)  # empty (checked above)
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(out_dir, f"{i:05d}.tar") for i in range(n)], written, skipped


def _pack(pairs, paths, out_dir, shard_size, resize):
    shards, tar, written, skipped = [], None, 0, 0
    for (file, caption), path in zip(pairs, paths):
        try:
            if not caption.strip():
                raise ImageError(f"{file}: empty caption")
            img = load_image(path)
        except ImageError as e:
            print(f"pack: skipped {e}", file=sys.stderr)
            skipped += 1
            continue
        ext = os.path.splitext(file)[1].lower().lstrip(".").replace("jpeg", "jpg")  # "a.JPEG" -> "jpg"
        if resize or ext not in IMAGE_EXTS:  # re-encode (resized to resize x resize, bicubic) as JPEG
            img = img.resize((resize, resize), Image.BICUBIC) if resize else img
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)
            blob, ext = buf.getvalue(), "jpg"
        else:  # the original bytes
            blob = checks.read_bytes(path, "image", MAX_IMAGE_BYTES)
        if written % shard_size == 0:  # start the next shard
            if tar:
                tar.close()
            os.makedirs(out_dir, exist_ok=True)
            shards.append(os.path.join(out_dir, f"{len(shards):05d}.tar"))
            tar = tarfile.open(shards[-1], "w")
        key = f"{len(shards) - 1:05d}" + str(written % shard_size).zfill(len(str(shard_size - 1)))  # shard+index
        meta = json.dumps({"caption": caption, "key": key, "file": file}).encode()
        for name, b in ((f"{key}.{ext}", blob), (f"{key}.txt", caption.encode()), (f"{key}.json", meta)):
            info = tarfile.TarInfo(name)
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
        written += 1
    if tar:
        tar.close()
    return len(shards), written, skipped


def main(argv=None):
    p = checks.ArgumentParser(description="MiniGPT-4 data tools")  # a bad option: one `error:` line
    pk = p.add_subparsers(dest="cmd", required=True).add_parser("pack", help="images + captions -> tar shards")
    pk.add_argument("images_dir")
    pk.add_argument("captions", help="JSON {file: caption} or [{file, caption}], or CSV with columns file,caption")
    pk.add_argument("out_dir")
    pk.add_argument("--shard-size", type=int, default=1000)
    pk.add_argument("--resize", type=int, default=None, help="store images resized to NxN (bicubic, JPEG)")
    args = p.parse_args(argv)
    try:
        shards, written, skipped = pack(args.images_dir, args.captions, args.out_dir, args.shard_size, args.resize)
        if written == 0:
            raise ValueError(f"no sample written to {args.out_dir} ({skipped} skipped)")
    except (ValueError, OSError) as e:  # one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {written} samples in {len(shards)} shards to {args.out_dir} ({skipped} skipped)")


if __name__ == "__main__":
    sys.exit(main())
