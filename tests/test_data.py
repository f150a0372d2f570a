"""data.py: preprocessing vs the original's pixel_values, a bad-image corpus, the shard and align datasets."""
import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import IMAGES, assert_close, load_reference, write_tar

PHOTOS = sorted(IMAGES.glob("*.jpg"))


# ---------------------------------------------------------------------------------------------- images

def test_pixel_values_match_reference(ref_dir, ref_config):
    ref, _ = load_reference(ref_dir)
    files = [im["file"] for im in ref_config["images"]]
    size = ref["pixel_values"].shape[-1]
    ours = torch.stack([data.preprocess(ref_dir / f, size=size) for f in files])
    assert_close(ours, ref["pixel_values"], "pixel_values")
    assert (ours - ref["pixel_values"]).abs().max().item() <= 1e-6
    # the same from bytes and from an already opened PIL image
    assert torch.equal(data.preprocess((ref_dir / files[0]).read_bytes(), size=size), ours[0])
    assert torch.equal(data.preprocess(Image.open(ref_dir / files[1]), size=size), ours[1])


def _png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _huge_png(width, height):
    """A tiny file whose header claims width x height RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.fixture
def corpus(tmp_path):
    """name -> (path, expected: 'ok' or 'error')."""
    photo = PHOTOS[0].read_bytes()
    c = {}
    (tmp_path / "empty.jpg").write_bytes(b"")
    c["empty"] = (tmp_path / "empty.jpg", "error")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    c["text"] = (tmp_path / "text.jpg", "error")
    (tmp_path / "truncated.jpg").write_bytes(photo[: len(photo) // 2])
    c["truncated"] = (tmp_path / "truncated.jpg", "error")
    (tmp_path / "huge.png").write_bytes(_huge_png(100_000, 100_000))
    c["bomb"] = (tmp_path / "huge.png", "error")
    c["missing"] = (tmp_path / "nope.jpg", "error")
    c["cmyk"] = (_save(Image.new("CMYK", (50, 30), (10, 200, 30, 5)), tmp_path / "cmyk.jpg"), "ok")
    gray16 = Image.fromarray((np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16))
    c["gray16"] = (_save(gray16, tmp_path / "gray16.png"), "ok")
    pal = Image.new("P", (33, 17))
    pal.putpalette([0, 0, 0, 255, 0, 0] + [7] * 762)
    c["palette_transparency"] = (_save(pal, tmp_path / "pal.png", transparency=0), "ok")
    c["one_pixel"] = (_save(Image.new("RGB", (1, 1), (200, 10, 30)), tmp_path / "one.png"), "ok")
    c["gray"] = (_save(Image.new("L", (20, 60), 90), tmp_path / "gray.jpg"), "ok")
    c["rgba"] = (_save(Image.new("RGBA", (64, 48), (1, 2, 3, 0)), tmp_path / "rgba.png"), "ok")
    return c


def test_bad_image_corpus(corpus):
    for name, (path, expected) in corpus.items():
        if expected == "ok":
            x = data.preprocess(path)
            assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all(), name
        else:
            with pytest.raises(data.ImageError) as e:
                data.preprocess(path)
            assert str(path) in str(e.value) and "\n" not in str(e.value), name
    with pytest.raises(data.ImageError, match="MAX_IMAGE_PIXELS"):
        data.load_image(corpus["bomb"][0])
    with pytest.raises(data.ImageError, match="my-bytes"):
        data.load_image(b"", name="my-bytes")


def test_16bit_scaled_like_8bit(tmp_path):
    level = np.arange(256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray(level * 257).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    ours = np.asarray(data.load_image(tmp_path / "g16.png"))
    assert np.array_equal(ours, np.asarray(Image.fromarray(level.astype(np.uint8)).convert("RGB")))


def test_alpha_and_palette_follow_convert_rgb(tmp_path):
    rgba = Image.fromarray(np.random.RandomState(0).randint(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "a.png")
    assert np.array_equal(np.asarray(data.load_image(tmp_path / "a.png")), np.asarray(rgba)[..., :3])


def test_exif_orientation_opt_in(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert data.load_image(tmp_path / "rot.jpg").size == (40, 20)  # the original ignores EXIF
    assert data.load_image(tmp_path / "rot.jpg", exif=True).size == (20, 40)


def test_train_variant_seeded_and_differs_from_eval():
    x_eval = data.preprocess(PHOTOS[0])
    a = data.preprocess(PHOTOS[0], train=True, generator=torch.Generator().manual_seed(3))
    b = data.preprocess(PHOTOS[0], train=True, generator=torch.Generator().manual_seed(3))
    c = data.preprocess(PHOTOS[0], train=True, generator=torch.Generator().manual_seed(4))
    assert a.shape == x_eval.shape and torch.equal(a, b)
    assert not torch.equal(a, x_eval) and not torch.equal(a, c)
    torch.manual_seed(0)  # generator=None draws from torch's global RNG, as torchvision does
    d = data.preprocess(PHOTOS[0], train=True)
    assert torch.equal(d, data.preprocess(PHOTOS[0], train=True, generator=torch.Generator().manual_seed(0)))


def test_random_resized_crop_params():
    g = torch.Generator().manual_seed(0)
    for w, h in [(640, 480), (100, 1000), (1, 1), (3000, 20)]:
        for _ in range(50):
            i, j, ch, cw = data.random_resized_crop_params(w, h, generator=g)
            assert 0 <= i and 0 <= j and 0 < ch and 0 < cw and i + ch <= h and j + cw <= w
    # fallback: a very wide image gets the centre crop clamped to ratio 4/3
    assert data.random_resized_crop_params(3000, 20, generator=g) == (0, (3000 - 27) // 2, 20, 27)


# ---------------------------------------------------------------------------------------------- shards

def _jpg(seed, size=(24, 16)):
    arr = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def _shards(folder, n_shards, per_shard, prefix="s"):
    """Shards of generated images; captions 'Prefix Shard-Index!' (json for even, txt for odd samples)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key, cap = f"{s:05d}{i:04d}", f"{prefix.upper()} {s}-{i}!"
            members.append((f"{key}.jpg", _jpg(s * 1000 + i)))
            members.append((f"{key}.json", json.dumps({"caption": cap}).encode()) if i % 2 == 0 else
                           (f"{key}.txt", cap.encode()))
        paths.append(write_tar(folder / f"{s:05d}.tar", members))
    return paths


def test_read_tar_groups_members(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (5, 5)).save(png, "PNG")
    path = write_tar(tmp_path / "a.tar", [("x/k1.jpg", _jpg(0)), ("x/k1.json", b'{"caption": "A"}'),
                                            ("k2.PNG", png.getvalue()), ("k2.txt", b"B"), ("k2.meta.json", b"{}")])
    recs = list(data.read_tar(path))
    assert [k for k, _ in recs] == ["x/k1", "k2"]
    assert set(recs[1][1]) == {"png", "txt", "meta.json"}
    ds = data.ShardDataset(str(path), shuffle=0, size=8)
    assert [s["text"] for s in ds] == ["a", "b"]


def test_expand_shards(tmp_path):
    assert data.expand_shards("laion/{00000..00002}.tar", check=False) == [f"laion/0000{i}.tar" for i in range(3)]
    assert data.expand_shards("a/{8..10}.tar,b/{x,y}.tar::c.tar", check=False) == \
        ["a/8.tar", "a/9.tar", "a/10.tar", "b/x.tar", "b/y.tar", "c.tar"]
    paths = _shards(tmp_path / "d", 3, 1)
    assert data.expand_shards(str(tmp_path / "d" / "*.tar")) == [str(p) for p in paths]
    assert data.expand_shards([str(tmp_path / "d/{00000..00001}.tar")]) == [str(p) for p in paths[:2]]
    with pytest.raises(FileNotFoundError, match="3 of 6 files missing"):
        data.expand_shards(str(tmp_path / "d/{00000..00005}.tar"))
    with pytest.raises(FileNotFoundError, match="no shard"):
        data.expand_shards(str(tmp_path / "nothing/*.tar"))
    for spec in (str(tmp_path / "d"), str(tmp_path / "d") + "/"):  # a folder: say so, suggest the patterns
        with pytest.raises(FileNotFoundError, match="is a directory") as e:
            data.expand_shards(spec)
        assert f"'{tmp_path / 'd'}/*.tar'" in str(e.value) and f"'{tmp_path / 'd'}/{{00000..N}}.tar'" in str(e.value)
    # nested and repeated braces, padding from the first number, in order
    assert data.braceexpand("{a,b}/{8..10}-{0..1}") == [f"{x}/{n}-{m}" for x in "ab" for n in (8, 9, 10) for m in (0, 1)]
    assert data.braceexpand("s{099..101}.tar") == ["s099.tar", "s100.tar", "s101.tar"]


def test_pre_caption():
    assert data.pre_caption('A Dog: "Running"   (fast)!\n') == "a dog running fast"
    assert data.pre_caption("Hello, World; ok~") == "hello, world ok"
    long = " ".join(f"W{i}." for i in range(80))
    assert data.pre_caption(long) == " ".join(f"w{i}" for i in range(50))
    assert data.pre_caption(long, max_words=3) == "w0 w1 w2"


def test_split_covers_every_sample_once(tmp_path):
    paths = [str(p) for p in _shards(tmp_path, 8, 3)]
    ds = data.ShardDataset(paths, seed=0, shuffle=4, size=8)
    for epoch in range(2):
        ds.set_epoch(epoch)
        keys = [s["key"] for r in range(2) for w in range(2) for s in ds.stream(r, 2, w, 2)]
        assert len(keys) == 24 and len(set(keys)) == 24
    assert [len(data.split_shards(list(range(10)), r, 2, w, 2)) for r in range(2) for w in range(2)] == [3, 3, 2, 2]
    with pytest.warns(UserWarning, match="gets no shard"):  # fewer shards than workers: no repeats
        keys = [s["key"] for w in range(12) for s in ds.stream(0, 1, w, 12)]
    assert len(keys) == 24 and len(set(keys)) == 24


def test_shuffle_deterministic_per_epoch(tmp_path):
    paths = [str(p) for p in _shards(tmp_path, 4, 5)]

    def order(epoch):
        ds = data.ShardDataset(paths, seed=7, shuffle=6, size=8)
        ds.set_epoch(epoch)
        return [s["key"] for s in ds]
    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))


def test_train_variant_in_dataset_is_deterministic(tmp_path):
    paths = [str(p) for p in _shards(tmp_path, 1, 3)]
    one = [s["image"] for s in data.ShardDataset(paths, shuffle=0, size=8, train=True)]
    two = [s["image"] for s in data.ShardDataset(paths, shuffle=0, size=8, train=True)]
    assert all(torch.equal(x, y) for x, y in zip(one, two))


def test_resume_continues_exactly(tmp_path):
    paths = [str(p) for p in _shards(tmp_path, 4, 5)]
    kw = dict(seed=3, shuffle=5, size=8)
    full = [s["key"] for s in data.ShardDataset(paths, **kw)]
    ds = data.ShardDataset(paths, **kw)
    state, it = None, iter(ds)
    first = []
    for _ in range(7):
        s = next(it)
        first.append(s["key"])
        state = data.track(state, s)
    ds2 = data.ShardDataset(paths, **kw)
    ds2.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round-trip (str keys)
    ds2.set_epoch(state["epoch"])
    assert first + [s["key"] for s in ds2] == full


def test_resume_with_dataloader_workers(tmp_path):
    """2 real DataLoader workers with uneven streams (3 and 2 shards: 4 and 3 batches, so worker 1 finishes
    first): stopping after any batch and resuming gives exactly the remaining batches, in the same order."""
    paths = [str(p) for p in _shards(tmp_path, 5, 4)]
    kw = dict(seed=5, shuffle=3, size=8)

    def loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=data.collate)
    full, states, state = [], [], None
    for batch in loader(data.ShardDataset(paths, **kw)):
        full.append(batch["key"])
        state = data.track(state, batch)
        states.append(json.loads(json.dumps(state)))  # a copy, as saved (str keys after JSON)
    assert len(full) == 7 and len({k for b in full for k in b}) == 20
    assert [len(b) for b in full] == [3, 3, 3, 3, 3, 2, 3]  # w0, w1, w0, w1, w0, w1 (last: 2), w0
    for k in (0, 1, 4, 5):  # mid-round (next: worker 1) and after a round; 5: worker 1 done, then worker 0
        ds = data.ShardDataset(paths, **kw)
        ds.load_state_dict(states[k])
        assert [b["key"] for b in loader(ds)] == full[k + 1:], f"resumed after batch {k}"
    ds = data.ShardDataset(paths, **kw)
    ds.load_state_dict(dict(states[2], num_workers=4))
    with pytest.raises(ValueError, match="num_workers=4"):
        next(iter(ds))


def test_corrupt_samples_skipped_and_counted(tmp_path):
    good = _jpg(1)
    members = [("0.jpg", good), ("0.json", b'{"caption": "Fine"}'),
               ("1.jpg", good[: len(good) // 2]), ("1.json", b'{"caption": "truncated"}'),
               ("2.jpg", b"not a jpeg"), ("2.txt", b"text as jpg"),
               ("3.jpg", good), ("3.json", b'{"url": "no caption"}'),
               ("4.json", b'{"caption": "no image"}'),
               ("5.png", b""), ("5.txt", b"zero bytes"),
               ("6.jpg", good), ("6.txt", b"Also fine.")]
    path = write_tar(tmp_path / "bad.tar", members)
    ds = data.ShardDataset(str(path), shuffle=0, size=8)
    batches = list(torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, collate_fn=data.collate))
    assert [t for b in batches for t in b["text"]] == ["fine", "also fine"]
    assert sum(b["skipped"] for b in batches) == 5 and sum(len(b["errors"]) for b in batches) == 5
    assert all(b["image"].shape == (len(b["text"]), 3, 8, 8) for b in batches if b["text"])
    whole = write_tar(tmp_path / "whole.tar", members[:2] + members[-2:]).read_bytes()
    broken = tmp_path / "broken.tar"
    broken.write_bytes(whole[:512 + 1024 + 512 + 512 + 700])  # the first sample, then inside 6.jpg's data
    items = list(data.ShardDataset(str(broken), shuffle=0, size=8))
    assert items[0]["text"] == "fine" and any("broken shard" in (s.get("error") or "") for s in items)


# ---------------------------------------------------------------------------------------------- stage 2

def _align_folder(root):
    (root / "image").mkdir(parents=True)
    anns = []
    for i, photo in enumerate(PHOTOS[:3]):
        Image.open(photo).resize((40, 30)).save(root / "image" / f"{i}.jpg")
        anns.append({"image_id": str(i), "caption": f"The Image shows: Thing #{i}.\n"})
    anns.append({"image_id": "missing", "caption": "No file."})
    anns.append({"image_id": "0", "caption": ""})
    (root / "filter_cap.json").write_text(json.dumps({"annotations": anns}))
    return anns


def test_align_dataset(tmp_path):
    anns = _align_folder(tmp_path / "cc_sbu_align")
    ds = data.AlignDataset(tmp_path / "cc_sbu_align", seed=0, size=16)
    prompts = data.load_instructions()
    assert len(prompts) == 4 and prompts[0] == "<Img><ImageHere></Img> Describe this image in detail."
    assert len(ds) == 5
    items = [ds[i] for i in range(len(ds))]
    assert [s["text"] for s in items[:3]] == [a["caption"] for a in anns[:3]]  # not cleaned
    assert all(s["instruction"] in prompts for s in items[:3])
    assert items[3]["image"] is None and "missing.jpg" in items[3]["error"]
    assert items[4]["image"] is None and "no caption" in items[4]["error"]
    assert [ds[i]["instruction"] for i in range(3)] == [s["instruction"] for s in items[:3]]  # seeded
    batch = data.collate(items)
    assert batch["image"].shape == (3, 3, 16, 16) and batch["skipped"] == 2 and len(batch["instruction"]) == 3
    draws = {data.AlignDataset(tmp_path / "cc_sbu_align", seed=s, size=8)[0]["instruction"] for s in range(20)}
    assert len(draws) > 1
    user = tmp_path / "mine.txt"
    user.write_text("no placeholder\n<Img><ImageHere></Img> What is it?\n")
    assert data.AlignDataset(tmp_path / "cc_sbu_align", instructions=user)[0]["instruction"] == \
        "<Img><ImageHere></Img> What is it?"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "filter_cap.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="filter_cap.json"):
        data.AlignDataset(tmp_path / "bad")


# ---------------------------------------------------------------------------------------------- pack

def test_pack_round_trip(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    caps = {}
    for i, photo in enumerate(PHOTOS[:3]):
        Image.open(photo).resize((48, 36)).save(images / f"p{i}.jpg")
        caps[f"p{i}.jpg"] = f"Photo number {i}!"
    Image.new("LA", (9, 9)).save(images / "g.png")
    caps["g.png"] = "A Gray PNG"
    (images / "broken.jpg").write_text("nope")
    caps["broken.jpg"] = "skipped"
    (tmp_path / "caps.json").write_text(json.dumps(caps))
    assert data.main(["pack", str(images), str(tmp_path / "caps.json"), str(tmp_path / "out"), "--shard-size", "3"]) \
        in (0, None)
    out, err = capsys.readouterr()
    assert "wrote 4 samples in 2 shards" in out and "(1 skipped)" in out
    assert err.count("\n") == 1 and "skipped" in err and "broken.jpg" in err  # one line per skipped image
    shards = sorted((tmp_path / "out").glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar"]
    texts = sorted(s["text"] for s in data.ShardDataset(str(tmp_path / "out/{00000..00001}.tar"), size=8))
    assert texts == sorted(data.pre_caption(c) for f, c in caps.items() if f != "broken.jpg")
    assert dict(data.read_tar(shards[0]))["000000"]["jpg"] == (images / "p0.jpg").read_bytes()
    # CSV captions, resized storage
    (tmp_path / "caps.csv").write_text("file,caption\np0.jpg,\"One, with comma\"\np1.jpg,Two\n")
    shards, written, skipped = data.pack(str(images), str(tmp_path / "caps.csv"), str(tmp_path / "o2"), resize=32)
    assert (len(shards), written, skipped) == (1, 2, 0)
    recs = dict(data.read_tar(shards[0]))
    assert Image.open(io.BytesIO(recs["00000000"]["jpg"])).size == (32, 32)
    assert json.loads(recs["00000000"]["json"])["caption"] == "One, with comma"


def _pack_error(capsys, *argv):
    """Run `data.py pack ARGV`: must exit 1 with one line 'error: ...' on stderr (after any skip lines)."""
    assert data.main(["pack", *map(str, argv)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.endswith("\n") and err.splitlines()[-1].startswith("error: ")
    return err.splitlines()[-1]


def test_pack_bad_input_one_line_errors(tmp_path, capsys):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.jpg")
    (images / "broken.jpg").write_text("nope")
    good = tmp_path / "caps.json"
    good.write_text(json.dumps({"a.jpg": "A"}))
    out = tmp_path / "out"
    msg = _pack_error(capsys, tmp_path / "nope", good, out)
    assert "nope" in msg and "does not exist" in msg
    assert "--shard-size must be in [1, " in _pack_error(capsys, images, good, out, "--shard-size", "0")
    assert not out.exists()  # nothing created for bad arguments
    (tmp_path / "caps.txt").write_text("a.jpg: A\n")  # not JSON
    (tmp_path / "shape.json").write_text(json.dumps([{"name": "a.jpg"}]))
    (tmp_path / "nontext.json").write_text(json.dumps({"a.jpg": None}))
    (tmp_path / "number.json").write_text("5")
    (tmp_path / "cols.csv").write_text("image,text\na.jpg,A\n")
    for bad in ("missing.json", "caps.txt", "shape.json", "nontext.json", "number.json", "cols.csv"):
        msg = _pack_error(capsys, images, tmp_path / bad, out)
        assert str(tmp_path / bad) in msg and "captions file" in msg, bad
    with pytest.raises(ValueError, match="caps.txt"):  # the Python API raises the same ValueError
        data.read_captions(tmp_path / "caps.txt")
    (tmp_path / "only_broken.json").write_text(json.dumps({"broken.jpg": "B", "gone.jpg": "C"}))
    assert data.main(["pack", str(images), str(tmp_path / "only_broken.json"), str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "broken.jpg" in err[0] and "gone.jpg" in err[1]
    assert err[2] == f"error: no sample written to {out} (2 skipped)"
    # a CSV with a BOM (as spreadsheets save it) and a JSON list of [file, caption] both read
    (tmp_path / "bom.csv").write_bytes("file,caption\na.jpg,A\n".encode("utf-8-sig"))
    (tmp_path / "list.json").write_text(json.dumps([["a.jpg", "A"]]))
    assert data.read_captions(tmp_path / "bom.csv") == data.read_captions(tmp_path / "list.json") == [("a.jpg", "A")]


def test_pack_command_line_exit_status(tmp_path):
    """The real `python data.py pack`: exit status 1 and one stderr line, no traceback."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(repo, "data.py"), "pack", str(tmp_path / "nope"),
                          str(tmp_path / "caps.json"), str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines() == [f"error: images folder {tmp_path / 'nope'} does not exist or is not a folder"]
