"""
Reading checkpoint files safely and loading them into models built on the meta device.

Shared by vit.py, qformer.py, llama.py and model.py so that every model file loads the same way:
  1. build the model under `torch.device("meta")` (no memory, no random init),
  2. read the checkpoint (or one shard of it) with `read_checkpoint`,
  3. move each tensor into place with `assign`, cast to the target dtype on the target device,
  4. `check_complete` raises if any parameter was never loaded.
`param_dtype` (Linear/Conv weights in the target dtype, the rest in fp32) and `from_file` (config fields that
the checkpoint's shapes decide) are shared by vit.py and qformer.py.
Every problem raises CheckpointError with one line that names the file or the key.
"""
import os
import pickle
import re
import stat
import sys
import zipfile
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn as nn


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the model."""


def read_checkpoint(path):
    """Read a .pth/.bin (torch zip, tensors only: weights_only=True) or .safetensors file -> dict."""
    path = str(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or folder)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    is_zip = zipfile.is_zipfile(path)  # torch.save's format since PyTorch 1.6 (older files: legacy pickle)
    try:
        # mmap: tensors stay on disk until used, so a shard costs no more memory than what we keep of it
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # torch's own message suggests weights_only=False: never repeat that
        blocked = re.search(r"(?:unsupported |Unsupported global: )(GLOBAL [\w.]+)", str(e))
        if blocked:
            raise CheckpointError(f"{path}: refused to load: its pickle asks for {blocked.group(1)}, which is not a "
                                  "tensor or plain container (only weights are ever unpickled)") from None
        why = "neither a torch.save zip file nor a legacy PyTorch checkpoint"
        if is_zip:
            why = "a pickle of something other than tensors" if isinstance(e, pickle.UnpicklingError) else first_line(e)
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({why})") from None


def first_line(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


@contextmanager
def json_errors(path):
    """A missing or invalid JSON file, a missing key or a bad value -> one CheckpointError naming `path`."""
    try:
        yield
    except KeyError as e:
        raise CheckpointError(f"{path}: missing key {e}") from None
    except (OSError, ValueError, TypeError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: {first_line(e)}") from None


def unwrap(state, path="checkpoint"):
    """LAVIS/MiniGPT-4 files hold {"model": state_dict, ...}; plain files are the state dict itself."""
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return state


def assign(model, key, tensor, dtype=None, device="cpu"):
    """Put `tensor` at parameter/buffer `key` of `model` (cast to dtype, on device), checking the shape."""
    module_name, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    if module is None or (name not in module._parameters and name not in module._buffers):
        raise CheckpointError(f"unexpected key in checkpoint: {key}")
    old = getattr(module, name)
    if tuple(old.shape) != tuple(tensor.shape):
        raise CheckpointError(f"shape mismatch for {key}: checkpoint has {list(tensor.shape)}, "
                              f"model expects {list(old.shape)}")
    if old.is_floating_point() and not tensor.is_floating_point():  # ints, bools, float bits relabelled as ints
        raise CheckpointError(f"{key}: checkpoint holds {tensor.dtype}, expected floating point weights")
    if tensor.dim() <= 1 and tensor.is_floating_point() and not torch.isfinite(tensor).all():  # norms, biases
        raise CheckpointError(f"{key}: holds NaN or infinite values")
    dtype = dtype if (dtype is not None and old.is_floating_point()) else old.dtype
    t = tensor.to(device=device, dtype=dtype)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(t, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = t


def check_complete(model, what="checkpoint"):
    """Raise if any parameter or persistent buffer is still on the meta device (never loaded)."""
    missing = [k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{what} is missing {len(missing)} key(s): {', '.join(missing[:5])}{more}")


def param_dtype(model, key, dtype):
    """Linear/Conv parameters take `dtype`; everything else (LayerNorms, cls/pos, q/v biases) stays fp32."""
    try:
        owner = model.get_submodule(key.rpartition(".")[0])
    except AttributeError:
        return dtype  # not a model key: assign() reports it
    return dtype if isinstance(owner, (nn.Linear, nn.Conv2d)) else torch.float32


def from_file(config, found, path, log=True):
    """`config` with the fields the checkpoint determines replaced by the file's values (logged if different)."""
    changed = [f"{k} {getattr(config, k)} -> {v}" for k, v in found.items() if getattr(config, k) != v]
    if changed and log:
        print(f"{path}: config values replaced by the checkpoint's: {', '.join(changed)}", file=sys.stderr)
    return replace(config, **found)
