"""
Checks for everything that comes from outside the code: config values, command-line options, paths, files,
user text, and the writing of outputs. One place, so that every CLI and loader refuses bad input the same way:
a ValueError (or OSError) with ONE line that names the file, field or option, raised before anything is
allocated, read without bound, or overwritten. The CLIs print it as `error: ...` and exit 1.

    check_fields(cfg, "config.json", LIMITS)  # every dataclass field: its type, finite, within (lo, hi)
    number("--top-p", x, lo=0, hi=1, lo_open=True)   # one option's domain, where it is parsed
    open_file(path, "rb", what="image", limit=MAX)   # regular files only (never a FIFO or /dev/zero), bounded
    inside(folder, name, "filter_cap.json image_id")  # a name from a file may not leave its folder
    atomic_save(obj, path)                            # temp file + fsync + rename; the old file survives a failure
"""
import argparse
import math
import os
import stat
import sys
import typing
from dataclasses import fields

SEED_MAX = 2 ** 63 - 1  # torch.manual_seed takes at most 64 bits; seeds are offset by rank/dataset


# ----------------------------------------------------------------------------------------- values
def number(name, value, lo=None, hi=None, lo_open=False, integer=False):
    """`value` must be a finite number (an int if integer) in [lo, hi] ((lo, hi] if lo_open) -> value."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):  # (an int is finite: 10**400 has no float)
        raise ValueError(f"{name} must be finite, got {value}")
    low_bad = lo is not None and (value <= lo if lo_open else value < lo)
    if low_bad or (hi is not None and value > hi):
        lo_s = "-inf" if lo is None else lo
        got = str(value) if len(str(value)) <= 40 else f"{str(value)[:12]}... ({len(str(value))} digits)"
        raise ValueError(f"{name} must be in {'(' if lo_open else '['}{lo_s}, {'inf' if hi is None else hi}], got {got}")
    return value


def check_fields(obj, where, limits):
    """Every field of the dataclass `obj` must have its annotated type (int, float, bool, str, tuple of ints;
    Optional allows None) and, for numbers, lie in limits[name] = (lo, hi) or (lo, hi, "open") -> obj. Errors
    name `where: field`, or `where` with {} replaced by the field ("--{}": the command-line option)."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value, t = getattr(obj, f.name), hints[f.name]
        args = typing.get_args(t)
        if type(None) in args:  # Optional[X]
            if value is None:
                continue
            t = next(a for a in args if a is not type(None))
        name = where.replace("{}", f.name) if "{}" in where else f"{where}: {f.name}"
        if t is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        elif t in (int, float):
            lo, hi, *open_ = limits.get(f.name, (None, None))
            number(name, value, lo, hi, lo_open=bool(open_), integer=t is int)
        elif t is str:
            if not isinstance(value, str):
                raise ValueError(f"{name} must be text, got {value!r}")
        elif t is tuple:
            if not isinstance(value, tuple):
                raise ValueError(f"{name} must be a list, got {value!r}")
            lo, hi = limits.get(f.name, (None, None))
            for v in value:
                number(name, v, lo, hi, integer=True)
    return obj


def divisible(where, a_name, a, b_name, b):
    if a % b:
        raise ValueError(f"{where}: {a_name} {a} is not divisible by {b_name} {b}")


def seed(name, value):
    return number(name, value, 0, SEED_MAX, integer=True)


def device(spec, option="--device"):
    """A --device value -> torch.device: cpu, or cuda[:N] on a machine that has it; anything else refused."""
    import torch
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{option} {spec}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} {spec}: not supported (cpu, cuda, cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {spec}: CUDA is not available on this machine (use {option} cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


# -------------------------------------------------------------------------------------------- text
def user_text(text, reserved=()):
    """Text typed by a user is text: undecodable bytes (argv/stdin surrogate escapes) become U+FFFD, and each
    `reserved` string (the image slot, the tokenizer's "<s>"...) is broken with a word joiner after its first
    character, so it reaches the tokenizer as ordinary characters, never as a slot or a special token."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # escaped bytes -> U+FFFD
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte ("\ud800")
        text = text.encode("utf-8", "replace").decode("utf-8")
    for r in reserved:
        text = text.replace(r, r[0] + "\u2060" + r[1:])
    return text


# ------------------------------------------------------------------------------------------- paths
def inside(folder, name, what):
    """`name` from a file (a shard in an index, an image_id, a captions entry) -> folder/name, refused if it is
    absolute or climbs out of `folder` (.., or a symlink leading elsewhere)."""
    name = os.fspath(name)
    if not name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") or "\0" in name:
        raise ValueError(f"{what} {name!r}: must be a file name inside {folder}")
    path = os.path.join(folder, name)
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise ValueError(f"{what} {name!r}: leads outside {folder}")
    return path


def open_file(path, mode="rb", what="file", limit=None, encoding="utf-8", **kw):
    """open() for a regular file only: a FIFO, device or folder is refused without blocking (O_NONBLOCK, then
    fstat), and a file over `limit` bytes is refused before it is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise OSError(f"cannot open {what} {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ValueError(f"{what} {path}: not a regular file (a FIFO, device or folder)")
    if limit is not None and st.st_size > limit:
        os.close(fd)
        raise ValueError(f"{what} {path}: {st.st_size:,} bytes, more than the {limit:,} allowed")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding}), **kw)


def read_bytes(path, what="file", limit=None):
    with open_file(path, "rb", what, limit) as f:  # read(n) allocates n bytes at once: ask for the size + 1
        data = f.read() if limit is None else f.read(min(limit, os.fstat(f.fileno()).st_size) + 1)
    if limit is not None and len(data) > limit:  # grew after the stat
        raise ValueError(f"{what} {path}: more than the {limit:,} bytes allowed")
    return data


# ------------------------------------------------------------------------------------------ writing
def create(path):
    """A new file for writing -> file object; an existing entry (a planted symlink, a FIFO) is removed first,
    and the file is created exclusively without following links, so a write never lands outside its folder."""
    if os.path.lexists(path):
        os.remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "wb")


def append_line(path, line):
    """Append one text line to a regular file (created if needed), never through a symlink or into a FIFO."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file (a FIFO or device)")
        f.write(line + "\n")


def writable_dir(folder, option="--out_dir"):
    """Create `folder` if needed and prove it is writable (a probe file), before any work is done."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with create(probe) as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as e:
        raise OSError(f"{option} {folder}: not writable ({e.strerror})") from None


def atomic_save(obj, path, save=None):
    """save(obj, file) (default torch.save) into path.tmp, fsync, rename over `path`, fsync the folder: a crash or a full disk at
    any point leaves the previous `path` whole. On failure the temp file is removed and one OSError says so."""
    import torch
    tmp = f"{path}.tmp"
    try:
        with create(tmp) as f:
            (save or torch.save)(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        try:
            os.remove(tmp)
        except OSError:
            pass
        kept = f"the last good one is kept at {path}" if os.path.isfile(path) else "none was written before"
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:200]
        raise OSError(f"cannot write {path} ({why}); {kept}") from None
    try:  # the rename itself reaches the disk
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is done


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad option is ONE `error: ...` line on stderr (no usage block), exit status 2."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


# ------------------------------------------------------------------------------- saved structures
NAT = "natural"  # schema: an int >= 0


def check_tree(value, schema, where):
    """A value read from a file (a resume checkpoint's step, loss, data, rng...) must match `schema`: a type
    (int excludes bool; float accepts int), NAT, None, a dict {key: schema} (exactly these keys), {type: schema}
    (any keys of that type), a list [schema] (any length), or a tuple of alternatives."""
    if isinstance(schema, tuple):
        errors = []
        for alt in schema:
            try:
                return check_tree(value, alt, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    ok = True
    if schema is None:
        ok = value is None
    elif schema is NAT:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif schema is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(schema, type):
        ok = isinstance(value, schema) and not (schema is int and isinstance(value, bool))
    elif isinstance(schema, list):
        if not isinstance(value, list):
            ok = False
        else:
            for i, v in enumerate(value):
                check_tree(v, schema[0], f"{where}[{i}]")
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            ok = False
        elif len(schema) == 1 and isinstance(next(iter(schema)), type):  # {key type: value schema}
            (kt, vs), = schema.items()
            for k, v in value.items():
                check_tree(k, kt, f"{where} key")
                check_tree(v, vs, f"{where}[{k!r}]")
        else:
            if set(value) != set(schema):
                raise ValueError(f"{where}: expected the keys {sorted(schema)}, found {sorted(map(str, value))[:8]}")
            for k, s in schema.items():
                check_tree(value[k], s, f"{where}[{k!r}]")
    if not ok:
        raise ValueError(f"{where}: unexpected {type(value).__name__} {str(value)[:60]!r}")
    return value


def optimizer_state(sd, optimizer, where):
    """A saved torch.optim state dict must fit `optimizer`: its groups and parameter counts, and per parameter
    floating tensors of the parameter's shape (AdamW: exp_avg, exp_avg_sq; a scalar step)."""
    import torch
    check_tree(sd, {"state": {int: {str: torch.Tensor}}, "param_groups": [dict]}, where)
    groups = optimizer.param_groups
    if [len(g.get("params", ())) for g in sd["param_groups"]] != [len(g["params"]) for g in groups]:
        raise ValueError(f"{where}: its parameter groups do not match the trained parameters")
    params = [p for g in groups for p in g["params"]]
    for i, state in sd["state"].items():
        if not 0 <= i < len(params):
            raise ValueError(f"{where}: state for a parameter {i} that does not exist")
        for name, t in state.items():
            want = () if name == "step" else tuple(params[i].shape)
            if tuple(t.shape) != want or not t.is_floating_point():
                raise ValueError(f"{where}: state[{i}][{name!r}] is {t.dtype} {list(t.shape)}, expected "
                                 f"floating point {list(want)}")


POSITION = {"epoch": NAT, "world_size": NAT, "num_workers": NAT, "positions": {int: NAT}, "next": NAT}  # data.track
DATA_STATE = ({"drawn": NAT, "sources": [{"epoch": NAT, "pos": (None, POSITION, {"epoch": NAT, "batches": NAT})}]},
              None)  # train.Batches.state_dict(); None: batches fed by a test


def train_checkpoint(ck, path, optimizer, total_steps, world):
    """A train.py checkpoint to resume from: every key of the expected type and shape, before any is used;
    else one CheckpointError naming the file and the key."""
    try:
        _train_checkpoint(ck, path, optimizer, total_steps, world)
    except ValueError as e:
        from checkpoint import CheckpointError
        raise CheckpointError(str(e)) from None


def _train_checkpoint(ck, path, optimizer, total_steps, world):
    import torch
    keys = ("model", "optimizer", "scaler", "config", "step", "rng", "data", "loss")
    missing = [k for k in keys if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"{path}: cannot resume, no {', '.join(missing)} (not a train.py checkpoint?)")
    check_tree(ck["config"], {str: (int, float, str, bool)}, f"{path}: config")
    step = check_tree(ck["step"], NAT, f"{path}: step")
    if step > total_steps:
        raise ValueError(f"{path}: step {step} is beyond the schedule's {total_steps} steps (max_epoch x iters_per_epoch)")
    if len(check_tree(ck["loss"], [float], f"{path}: loss")) != step:
        raise ValueError(f"{path}: loss holds {len(ck['loss'])} values for {step} steps")
    for name, schema in (("rng", [torch.Tensor]), ("data", [DATA_STATE])):
        if len(check_tree(ck[name], schema, f"{path}: {name}")) != world:
            raise ValueError(f"{path} was saved by {len(ck[name])} processes, resuming with {world}")
    like = torch.get_rng_state()
    for i, r in enumerate(ck["rng"]):
        if r.dtype != like.dtype or r.shape != like.shape:
            raise ValueError(f"{path}: rng[{i}] is {r.dtype} {list(r.shape)}, not a torch RNG state")
    optimizer_state(ck["optimizer"], optimizer, f"{path}: optimizer")
    check_tree(ck["scaler"], {str: (float, bool, None)}, f"{path}: scaler")
