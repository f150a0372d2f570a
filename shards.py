"""Stage-1 shard lists and reading: brace ranges/globs/lists -> tar files, their split over ranks and workers,
and the samples of one webdataset tar shard, each member read with a size bound (a bigger one: a skipped sample)."""
import glob as globlib
import os
import re
import tarfile

MAX_MEMBER_BYTES = 64 * 2**20  # one image or caption inside a shard; a bigger member is skipped and counted
MAX_SHARDS = 10**6             # a brace range wider than this is a typo, not a dataset


def braceexpand(pattern):
    """'a/{000..002}.tar' -> a/000.tar a/001.tar a/002.tar (zero padding from the first number); '{x,y}' too."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    if r:  # a range, as wide as its first number: {8..10} -> 8 9 10; {000..002} -> 000 001 002
        first, last = int(r.group(1)), int(r.group(2))
        if first > last or last - first >= MAX_SHARDS:
            raise ValueError(f"brace range {m.group(0)} in {pattern!r}: " + (
                f"reversed (write {{{r.group(2)}..{r.group(1)}}})" if first > last else f"over {MAX_SHARDS:,} items"))
        items = [str(i).zfill(len(r.group(1))) for i in range(first, last + 1)]
    else:  # a list: {x,y} -> x y
        items = m.group(1).split(",")
    out = []
    for item in items:  # each item in place of {...}, then the braces left in each, flattened
        out += braceexpand(pattern[:m.start()] + item + pattern[m.end():])
        if len(out) > MAX_SHARDS:
            raise ValueError(f"{pattern!r} expands to over {MAX_SHARDS:,} shards")
    return out


def expand_shards(spec, check=True):
    """Shard files from brace ranges, globs, lists joined by ',' or '::' (outside braces), or a Python list.
    check: every file must exist (one error listing the first missing ones)."""
    out = []
    for part in (spec if isinstance(spec, (list, tuple)) else [spec]):
        for piece in re.split(r"::|,(?![^{]*\})", os.fspath(part)):  # at '::', and at ',' outside {...}
            for p in braceexpand(piece.strip()):
                if re.search(r"[*?\[]", p):  # a glob
                    hits = sorted(globlib.glob(p))
                    if check and not hits:
                        raise FileNotFoundError(f"no shard matches {p!r}")
                    out += hits
                elif check and os.path.isdir(p):
                    raise FileNotFoundError(f"shards {p!r} is a directory: give its tar files, e.g. "
                                            f"'{p.rstrip('/')}/*.tar' or '{p.rstrip('/')}/{{00000..N}}.tar'")
                elif p:
                    out.append(p)
    missing = [p for p in out if not os.path.isfile(p)] if check else []
    if check and (missing or not out):
        raise FileNotFoundError(f"shards {spec!r}: {len(missing)} of {len(out)} files missing {missing[:3]}")
    return out


def split_shards(shards, rank=0, world_size=1, worker=0, num_workers=1):
    """The shards of one DataLoader worker: every (world_size * num_workers)-th shard, starting at its global
    worker id rank * num_workers + worker. Disjoint and complete over all workers of all ranks."""
    return shards[rank * num_workers + worker::world_size * num_workers]


def read_tar(path):
    """(key, {ext: bytes}) for each sample of an img2dataset/webdataset shard, in file order. The key is the
    member path up to the first dot of its base name; consecutive members with one key form a sample."""
    key, rec = None, {}
    with tarfile.open(path, "r|*") as tar:
        for m in tar:
            folder, base = os.path.split(m.name)
            if not m.isfile() or "." not in base or base.startswith("."):
                continue
            k, ext = base.split(".", 1)
            k = f"{folder}/{k}" if folder else k
            if k != key and rec:
                yield key, rec
                rec = {}
            key = k
            if m.size > MAX_MEMBER_BYTES:  # never read: the sample is skipped and counted (data._bad)
                rec["error"] = f"{path}:{m.name}: {m.size:,} bytes, over the {MAX_MEMBER_BYTES:,} allowed per member"
            else:
                rec[ext.lower()] = tar.extractfile(m).read()
    if rec:
        yield key, rec
