"""Low-memory mode: weight-only int8 / int4 for every Linear of the LLM (the ViT, Q-Former and llama_proj keep their
precision; the original loads Vicuna in 8 bits through bitsandbytes). Activations stay in the model dtype.

  int8: one scale per output channel, w ~= q * scale, q in [-128, 127]: 1 byte per weight (+ N scales).
  int4: per group of `group_size` input channels, round-to-nearest between the group's min and max (gpt-fast's
        int4 scheme): w ~= (q - 8) * scale + zero, q in [0, 15], two per byte (low nibble: even column).

Quantizing happens while loading (`Llama.from_pretrained(..., quant=...)`): the model is built on the meta device,
its Linears become QuantLinears, and `quantized_items` turns each float weight into its quantized buffers as the
checkpoint is read, one tensor at a time, so the full-precision model is never in memory. A saved quantized folder
(`save_quantized`) loads through the same path: its weights are already integers and pass through unchanged.
The matmul: torch._weight_int8pack_mm (fused int8, CPU and CUDA) where it runs, else dequantize-then-matmul (int4
always: torch 2.13's fused int4 ops want a device-specific tile layout, not this portable two-per-byte one)."""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("int8", "int4")


# ----------------------------------------------------------------------------------------------- the math
ROWS = 1024  # rows quantized at a time: the fp32 temporaries stay small next to a shard


def by_rows(fn):
    """Apply fn to blocks of ROWS rows of w (N, K) and concatenate each of its outputs along dim 0."""
    def wrapped(w, *args):
        parts = [fn(rows, *args) for rows in w.split(ROWS)]
        return tuple(torch.cat(outs) for outs in zip(*parts))
    return wrapped


@by_rows
def quantize_int8(w):
    """w (N, K) float -> q (N, K) int8, scales (N,) fp32 (absmax / 127 per output channel)."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127  # (N,)
    return torch.round(w / scales[:, None]).clamp_(-128, 127).to(torch.int8), scales


@by_rows
def quantize_int4(w, group_size):
    """w (N, K) float -> packed (N, Kp/2) uint8, scales, zeros (N, Kp/g) fp32; K is zero-padded to Kp = a
    multiple of group_size. Round-to-nearest between each group's min and max (gpt-fast's group_quantize_tensor)."""
    N, K = w.shape
    Kp = -(-K // group_size) * group_size
    w = F.pad(w.float(), (0, Kp - K)).view(N, Kp // group_size, group_size)  # (N, G, g)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scales = ((hi - lo) / 15).clamp(min=1e-6)
    zeros = lo + 8 * scales  # the value of q = 8, the middle of [0, 15]
    q = ((w - lo) / scales).round().clamp(0, 15).to(torch.uint8).view(N, Kp)
    return pack_int4(q), scales.squeeze(-1), zeros.squeeze(-1)


def pack_int4(q):  # (N, Kp) values 0..15 -> (N, Kp/2) uint8, two per byte
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed):  # (N, Kp/2) uint8 -> (N, Kp) values 0..15
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


def dequantize_int4(packed, scales, zeros, in_features, dtype):
    """-> w (N, K) in dtype: (q - 8) * scale + zero per group, the padding columns cut off."""
    N, G = scales.shape
    q = unpack_int4(packed).view(N, G, -1).to(dtype)  # (N, G, g)
    w = (q - 8) * scales[..., None].to(dtype) + zeros[..., None].to(dtype)
    return w.view(N, -1)[:, :in_features]


_FUSED_INT8 = {}  # (device type, dtype) -> whether torch._weight_int8pack_mm runs there


def int8_matmul(x2, q, scales):
    """x2 (M, K) @ (q * scales[:, None]).T -> (M, N): the fused op where it runs, else dequantize-then-matmul."""
    key, s = (x2.device.type, x2.dtype), scales.to(x2.dtype)
    if _FUSED_INT8.get(key, True):
        try:
            y = torch._weight_int8pack_mm(x2.contiguous(), q, s)
            _FUSED_INT8[key] = True
            return y
        except (RuntimeError, NotImplementedError):  # this device/dtype has no kernel: fall back from now on
            _FUSED_INT8[key] = False
    return x2 @ (q.to(x2.dtype) * s[:, None]).T


class Int8Linear(torch.autograd.Function):
    """y = x @ (q * s).T; backward reaches x only (the weights are frozen): grad_x = grad_y @ (q * s)."""

    @staticmethod
    def forward(ctx, x, q, scales):
        ctx.save_for_backward(q, scales)
        return int8_matmul(x.reshape(-1, x.shape[-1]), q, scales).view(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, grad):
        q, scales = ctx.saved_tensors
        return grad @ (q.to(grad.dtype) * scales.to(grad.dtype)[:, None]), None, None


class QuantLinear(nn.Module):
    """A bias-free nn.Linear whose weight is held quantized (buffers: weight, scales[, zeros]); frozen."""

    def __init__(self, in_features, out_features, mode="int8", group_size=32, dtype=torch.float32, device=None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantization {mode!r}: choose one of {', '.join(MODES)}")
        self.in_features, self.out_features, self.mode, self.group_size = in_features, out_features, mode, group_size
        if mode == "int8":
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        else:
            groups = -(-in_features // group_size)
            self.register_buffer("weight", torch.empty(out_features, groups * group_size // 2, dtype=torch.uint8,
                                                       device=device))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, device=device))
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype, device=device))

    def quantized(self, w):
        """float weight (N, K) -> {buffer name: tensor} of this layer's format (fp32 scales)."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {list(w.shape)} for a {self.out_features}x{self.in_features} Linear")
        if self.mode == "int8":
            q, s = quantize_int8(w)
            return {"weight": q, "scales": s}
        q, s, z = quantize_int4(w, self.group_size)
        return {"weight": q, "scales": s, "zeros": z}

    def dequantize(self, dtype=None):  # -> (N, K) float weight
        dtype = dtype or self.scales.dtype
        if self.mode == "int8":
            return self.weight.to(dtype) * self.scales.to(dtype)[:, None]
        return dequantize_int4(self.weight, self.scales, self.zeros, self.in_features, dtype)

    def forward(self, x):  # (..., K) -> (..., N)
        if self.mode == "int8":
            return Int8Linear.apply(x, self.weight, self.scales)
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self):
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{group}"


# ------------------------------------------------------------------------------------ applying it to a model
def quantize_(model, mode, group_size=32):
    """Replace every bias-free nn.Linear in `model` (in place) by a QuantLinear. On a meta-device model (loading)
    the new buffers are meta too; on a loaded model each weight is quantized now, then dropped. -> model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if child.bias is not None:
                raise ValueError(f"{name}.{child_name}: QuantLinear has no bias (LLaMA's Linears have none)")
            w = child.weight
            ql = QuantLinear(child.in_features, child.out_features, mode, group_size, w.dtype, w.device)
            if not w.is_meta:
                for k, v in ql.quantized(w.detach()).items():
                    getattr(ql, k).copy_(v)
            setattr(module, child_name, ql)
    for p in model.parameters():  # what is left of the LLM (embeddings, norms) stays frozen
        p.requires_grad_(False)
    return model


def quantized_items(model, items):
    """(key, tensor) pairs of a float checkpoint -> pairs for the quantized `model`: the float weight of each
    QuantLinear becomes its weight/scales[/zeros] buffers, one tensor at a time. Integer weights (a saved
    quantized checkpoint) and every other key pass through. A tied LM head is quantized from the embeddings."""
    qlinears = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False) and "lm_head" in qlinears
    for key, tensor in items:
        name, _, leaf = key.rpartition(".")
        if leaf == "weight" and name in qlinears and tensor.is_floating_point():
            for k, v in qlinears[name].quantized(tensor).items():
                yield f"{name}.{k}", v
        else:  # a copy: a view would keep the whole (memory-mapped) shard resident
            yield key, tensor.clone()
        if tied and key == "model.embed_tokens.weight":
            yield from ((f"lm_head.{k}", v) for k, v in qlinears["lm_head"].quantized(tensor).items())


def save_quantized(llama, folder, tokenizer=None):
    """Write a quantized Llama as an HF-style folder (config.json with a "quantization" entry, model.safetensors;
    tokenizer.model copied from `tokenizer` if given) that Llama.from_pretrained loads without re-quantizing."""
    from safetensors.torch import save_file
    ql = next(m for m in llama.modules() if isinstance(m, QuantLinear))
    c = llama.cfg
    os.makedirs(folder, exist_ok=True)
    config = dict(hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                  num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size, intermediate_size=c.hidden_dim,
                  rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
                  tie_word_embeddings=c.tie_embeddings, quantization=dict(mode=ql.mode, group_size=ql.group_size))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    state = {k: v.contiguous() for k, v in llama.state_dict().items()  # a tied head is re-made from the embeddings
             if not (c.tie_embeddings and k.startswith("lm_head."))}
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"quantization": ql.mode})
    if tokenizer is not None:
        import shutil
        src = os.path.join(tokenizer, "tokenizer.model") if os.path.isdir(tokenizer) else tokenizer
        shutil.copy(src, os.path.join(folder, "tokenizer.model"))


def saved_quantization(folder):
    """(mode, group_size) recorded by save_quantized in folder/config.json, else (None, None)."""
    path = os.path.join(str(folder), "config.json")
    if not os.path.isfile(path):
        return None, None
    with open(path) as f:
        q = json.load(f).get("quantization") or {}
    return q.get("mode"), q.get("group_size")
