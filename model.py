"""MiniGPT-4: a frozen EVA ViT-G + BLIP-2 Q-Former looks at the image, one trained Linear (`llama_proj`) maps
its 32 query outputs into the word-embedding space of a frozen LLM (Vicuna v0), which reads [bos][prompt before
<ImageHere>][32 image embeddings][prompt after][text]. The Llama-2 variant has no Q-Former: it drops the CLS
token and feeds groups of 4 consecutive patch tokens (256 -> 64 embeddings). Attribute names follow the
original, so a projection checkpoint {"model": {"llama_proj.weight", "llama_proj.bias"}} loads in both.
The paper's Table 5 ablations are switches here (ABLATION): no Q-Former on the Vicuna side (the llama2 path),
three projection layers, the Q-Former trained too; a train.py checkpoint records its switches.
Also here: the original's training loss; decoding is in generate.py, the multi-turn `Chat` in sample.py."""
import json
import os
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import checks
from checkpoint import CheckpointError, json_errors, read_checkpoint, unwrap
from generate import beam_search, generate
from llama import Llama, LlamaConfig, find_gguf, load_tokenizer
from qformer import QFormer, QFormerConfig
from vit import ViTConfig, VisionTransformer

IMAGE = "<ImageHere>"
SYSTEM = ("Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
          "provide it to you. Please answer my questions.")


@dataclass
class ChatTemplate:  # conversation.py: prompt = system + sep + (role + message + sep)* + open
    system: str = SYSTEM
    sep: str = "###"
    user: str = "Human: "
    assistant: str = "Assistant: "
    open: str = "Assistant:"  # the last, empty assistant message (vicuna0: "Assistant:", no space)

    def user_turn(self, text):
        return self.user + text + self.sep

    def closing(self, answer):
        """What follows an answer's text in the history: the separator, less the part the answer ends with."""
        if self.sep in answer:
            return ""
        return self.sep[max([n for n in range(len(self.sep)) if answer.endswith(self.sep[:n])], default=0):]

    @property
    def head(self):  # the system message and its separator (none for an empty system message)
        return self.system + self.sep if self.system else ""

    def first_turn(self, question):
        """The original's first prompt: system, the image and the question, then the assistant's opening."""
        return self.head + self.user_turn(f"<Img>{IMAGE}</Img> {question}") + self.open


SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its template's default
TEMPLATES = {"vicuna0": ChatTemplate(),
             "llama2": ChatTemplate(sep="", user="<s>[INST] ", assistant=" [/INST] ", open=" [/INST] "),
             # ChatML (SmolLM2-Instruct's GGUF chat template): <|im_start|>role\ntext<|im_end|>\n per message
             "chatml": ChatTemplate(system="<|im_start|>system\n" + SMOLLM_SYSTEM, sep="<|im_end|>\n",
                                    user="<|im_start|>user\n", assistant="<|im_start|>assistant\n",
                                    open="<|im_start|>assistant\n"),
             "shapes": ChatTemplate(system="", sep="<|im_end|>\n", user="<|im_start|>user\n",  # ChatML, no
                                    assistant="<|im_start|>assistant\n", open="<|im_start|>assistant\n")}  # system


@dataclass
class MiniGPT4Config:
    variant: str = "vicuna0"  # "vicuna0": ViT -> Q-Former -> proj; "llama2": ViT -> 4 tokens grouped -> proj
    llm: str = "vicuna-7b"  # LlamaConfig preset (real shapes come from the LLM folder)
    vit: ViTConfig = field(default_factory=ViTConfig)
    qformer: Optional[QFormerConfig] = field(default_factory=QFormerConfig)  # the LLM width comes from the LLM
    group: int = 4  # llama2: consecutive patch tokens per image embedding
    ln_vision_eps: float = 1e-5
    prompt_template: str = "###Human: {} ###Assistant: "  # stage 2 (instruction tuning)
    end_sym: tuple = ("\n", "###")  # appended to the target text in stage 1 (no prompt) / stage 2
    max_txt_len: tuple = (32, 160)  # target text + end_sym is cut to this many tokens (stage 1 / 2)
    pad_piece: Optional[str] = None  # None: pad with eos (vicuna0); llama2 pads with the "$$" piece
    repetition_penalty: float = 1.0  # the demo's default (1.05 in the Llama-2 refactor)
    max_context: int = 2000  # chat: history + new tokens before old turns are dropped (capped by the LLM's)
    stop: tuple = ("###",)  # chat: stop strings (the original's ids [835] / [2277, 29937] are "###")
    template: Optional[str] = None  # chat template (TEMPLATES); None: the variant's
    proj_layers: int = 1  # Table 5 "+ 3 layers": Linear-GELU-Linear-GELU-Linear (the LLM's width inside)
    train_qformer: bool = False  # Table 5 "+ finetune Q-Former": its parameters are trained with llama_proj

    @property
    def chat_template(self):
        return TEMPLATES[self.template or self.variant]

    @classmethod
    def from_name(cls, name):
        if name not in PRESETS:
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS = {
    "vicuna-7b": dict(),
    "vicuna-13b": dict(llm="vicuna-13b"),
    "llama2-7b": dict(variant="llama2", llm="llama2-7b", qformer=None, prompt_template="[INST] {} [/INST] ",
                      end_sym=("\n", "</s>"), pad_piece="$$", repetition_penalty=1.05),
    "tiny": dict(llm="tiny", vit=ViTConfig.from_name("tiny"), qformer=QFormerConfig.from_name("tiny")),  # tests
    "smollm2": dict(llm="smollm2-135m", template="chatml", stop=("<|im_end|>",)),  # text-only chat (sample.py)
    # The miniature (README): bos is <|im_start|>, so the template starts after it; pad <|endoftext|>: eos is learned
    "shapes": dict(llm="smollm2-135m", vit=ViTConfig.from_name("shapes"), qformer=QFormerConfig.from_name("shapes"),
                   group=3,  # no_qformer: 9 patch tokens, 3 per embedding (a row of places)
                   template="shapes", prompt_template="user\n{}<|im_end|>\n<|im_start|>assistant\n",
                   end_sym=("<|im_end|>", "<|im_end|>"), pad_piece="<|endoftext|>", stop=("<|im_end|>",)),
}
ALIASES = {"llama2": "llama2-7b", "vicuna": "vicuna-13b", "vicuna7b": "vicuna-7b", "vicuna13b": "vicuna-13b"}
ABLATION = dict(no_qformer=False, proj_layers=1, train_qformer=False)  # Table 5's switches; these: the paper's model


def ablate(cfg, no_qformer=False, proj_layers=1, train_qformer=False):
    """A Table 5 variant of cfg. no_qformer: ViT tokens, CLS dropped, 4 grouped, straight to the projection (the
    llama2 path) with the Vicuna template; proj_layers 3; train_qformer: the Q-Former's weights trained too."""
    if no_qformer and train_qformer:
        raise ValueError("--train_qformer needs a Q-Former: not with --no_qformer")
    if proj_layers < 1:
        raise ValueError(f"--proj_layers must be >= 1, got {proj_layers}")
    return replace(cfg, qformer=None if no_qformer else cfg.qformer, proj_layers=proj_layers,
                   train_qformer=train_qformer)


def recorded_ablation(path):
    """The switches a train.py checkpoint records under "ablation" ({} for the original's files)."""
    ck = read_checkpoint(path)
    rec = ck.get("ablation", {}) if isinstance(ck, dict) else {}
    if not isinstance(rec, dict) or set(rec) - set(ABLATION):
        raise CheckpointError(f"{path}: unreadable \"ablation\" record {rec!r}")
    return rec


def projection(in_dim, dim, layers=1):
    """llama_proj: one Linear (the paper), or Linear-GELU-Linear-...-Linear (Table 5's "3 layers")."""
    mods = [nn.Linear(in_dim, dim)]
    for _ in range(layers - 1):
        mods += [nn.GELU(), nn.Linear(dim, dim)]
    return mods[0] if layers == 1 else nn.Sequential(*mods)

# --------------------------------------------------------------------------------------- weights on disk
LAVIS = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/"
URLS = {
    "vit": LAVIS + "eva_vit_g.pth",
    "qformer": LAVIS + "blip2_pretrained_flant5xxl.pth",
    "vicuna-7b": "https://huggingface.co/Vision-CAIR/vicuna-7b",
    "vicuna-13b": "https://huggingface.co/Vision-CAIR/vicuna",
    "llama2-7b": "https://huggingface.co/meta-llama/Llama-2-7b-chat-hf (gated: accept the license first)",
    "proj": "Google Drive, the original release's files (fetch.py downloads them)",
    "shapes": "python fetch.py --model smollm2 --out weights", "shapes:vit": "python pretrain_vision.py",  # miniature
    "shapes:qformer": "python pretrain_vision.py", "shapes:proj": "python train.py --stage 2 --config shapes",
}
# What a weights folder may hold, first match wins: the original release's names first. TEST FIXTURES: the last
# name of the qformer, proj and llm lists (blip2_pretrained.pth, minigpt4_*proj.pth, llama/) is the layout of
# tests/fixtures/reference/*, whose config.json `dims` (read by folder_configs below) a release folder lacks.
FILES = {
    "vit": ["eva_vit_g.pth"],
    "qformer": ["blip2_pretrained_flant5xxl.pth", "blip2_pretrained.pth"],
    "proj": {"shapes": ["minigpt4_shapes_proj.pth"],
             "vicuna-7b": ["prerained_minigpt4_7b.pth", "pretrained_minigpt4_7b.pth", "minigpt4_proj.pth"],
             "vicuna-13b": ["pretrained_minigpt4.pth", "pretrained_minigpt4_13b.pth", "minigpt4_proj.pth"],
             "llama2-7b": ["pretrained_minigpt4_llama2_7b.pth", "minigpt4_llama2_proj.pth"]},
    "llm": {"shapes": ["smollm2", "../smollm2"],  # pretrain_vision.py writes weights/shapes/ beside weights/smollm2/
            "vicuna-7b": ["vicuna-7b", "vicuna_7b", "llama"],  # `vicuna/` is the 13B repo: never picked for 7B
            "vicuna-13b": ["vicuna-13b", "vicuna_13b", "vicuna", "llama"],
            "llama2-7b": ["Llama-2-7b-chat-hf", "llama-2-7b-chat-hf", "llama2-7b", "llama2", "llama"]},
}


class MissingWeights(CheckpointError):
    """Some weight files are missing; the message lists each one and where to get it."""


def find_weights(folder, preset, vit=None, qformer=None, llm=None, proj=None):
    """Paths of the weight parts the preset needs: per-file overrides, else the first name of FILES found in
    `folder`. None for the parts not wanted: llama2's Q-Former, the projection when proj=False (a fresh one)."""
    if preset not in FILES["proj"]:
        raise ValueError(f"model {preset!r} has no release weights; choose from {', '.join(FILES['proj'])}")
    if folder and os.path.exists(folder) and not os.path.isdir(folder):
        raise MissingWeights(f"--weights {folder}: not a folder")
    parts = dict(vit=vit, qformer=qformer, llm=llm, proj=proj)
    if PRESETS[preset].get("variant") == "llama2":
        del parts["qformer"]
    if proj is False:
        del parts["proj"]
    if qformer is False:  # the no_qformer ablation
        parts.pop("qformer", None)
    paths, missing = dict(qformer=None, proj=None), []
    for part, override in parts.items():
        names = FILES[part] if isinstance(FILES[part], list) else FILES[part][preset]
        found = [os.path.join(folder, n) for n in names if folder and os.path.exists(os.path.join(folder, n))]
        path = override or (found[0] if found else None)
        if path is None or not os.path.exists(path):
            where = URLS.get(f"{preset}:{part}") or (URLS[preset] if part == "llm" else URLS[part])
            if path is None:  # nothing in the folder: what the release calls it (the LLM: a folder)
                path = os.path.join(folder or "", names[0] + "/" if part == "llm" else " or ".join(names[:2]))
            missing.append(f"  {part}: {path}  <- {where}")
        paths[part] = path
    if missing:
        raise MissingWeights("missing weights:\n" + "\n".join(missing))
    return paths


def folder_configs(folder):
    """Test fixtures, pretrain_vision.py's tower: (ViTConfig, QFormerConfig, ln_vision eps) from config.json `dims`."""
    path = os.path.join(folder or "", "config.json")
    if not (folder and os.path.isfile(path)):
        return None, None, None
    with json_errors(path), checks.open_file(path, "r", "config", limit=2**20) as f:
        dims = json.load(f).get("dims")
        if not dims:
            return None, None, None
        v, q = dims["vit"], dims["qformer"]
        vit = ViTConfig(img_size=v["img_size"], patch_size=v["patch_size"], width=v["embed_dim"], depth=v["depth"],
                        n_heads=v["num_heads"], mlp_hidden=v["mlp_hidden"], norm_eps=v["norm_eps"])
        qf = QFormerConfig(hidden_size=q["hidden_size"], n_layers=q["num_hidden_layers"],
                           n_heads=q["num_attention_heads"], intermediate_size=q["intermediate_size"],
                           norm_eps=q["layer_norm_eps"], encoder_width=q["encoder_width"],
                           n_queries=q["num_query_token"], cross_attention_freq=q["cross_attention_freq"],
                           cross_attention_layers=tuple(q["cross_attention_layers"]))
        return vit, qf, checks.number("ln_vision.eps", dims.get("ln_vision", {}).get("eps", 1e-5), 0, 1, lo_open=True)


# ----------------------------------------------------------------------------------------------- model
class MiniGPT4(nn.Module):
    def __init__(self, cfg: MiniGPT4Config, visual_encoder=None, Qformer=None, llama_model=None, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = VisionTransformer(cfg.vit) if visual_encoder is None else visual_encoder
        self.ln_vision = nn.LayerNorm(cfg.vit.width, eps=cfg.ln_vision_eps)  # llama2: weight 1, bias 0
        if cfg.qformer is not None and Qformer is None:  # cfg.qformer None: llama2, or the no_qformer ablation
            Qformer = QFormer(cfg.qformer)
        self.Qformer = Qformer if cfg.qformer is not None else None
        in_dim = cfg.vit.width * cfg.group if self.Qformer is None else self.Qformer.config.hidden_size
        self.llama_model = Llama(LlamaConfig.from_name(cfg.llm)) if llama_model is None else llama_model
        self.llama_proj = projection(in_dim, self.llama_model.cfg.dim, cfg.proj_layers)  # the trained parameters
        self.tokenizer = tokenizer
        trained = ("llama_proj.", "Qformer.") if cfg.train_qformer else ("llama_proj.",)
        for name, p in self.named_parameters():
            p.requires_grad_(name.startswith(trained))
        self.eval()

    @classmethod
    def from_pretrained(cls, weights=None, model="vicuna-7b", vit=None, qformer=None, llm=None, proj=None,
                        dtype=torch.float32, device="cpu", cfg=None, ablation=None, quant=None):
        """A weights folder laid out like the original release (or a test fixture), per-file overrides; sizes come
        from the files. proj: None = the folder's projection file, a path = that file (a train.py checkpoint: its
        Table 5 switches apply), False = a fresh fp32 projection (nn.Linear's init, current seed: stage 1).
        ablation: ABLATION's switches, checked against the checkpoint's record (None: as recorded). quant
        "int8"/"int4": the LLM's Linears quantized while loading (quant.py); the rest keeps `dtype`."""
        preset = ALIASES.get(model, model)
        cfg = cfg or MiniGPT4Config.from_name(preset)
        given = proj not in (None, False) and os.path.isfile(proj)  # (a missing file: find_weights lists it)
        trained = {**ABLATION, **recorded_ablation(proj)} if given else None
        asked = {**(trained or ABLATION), **(ablation or {})}
        if trained and trained != asked:
            raise CheckpointError(f"{proj} was trained with {trained}, not {asked}: give the switches it was "
                                  "trained with")
        cfg = ablate(cfg, **asked)
        paths = find_weights(weights, preset, vit, False if asked["no_qformer"] else qformer, llm, proj)
        vit_cfg, qf_cfg, ln_eps = folder_configs(weights)
        if not find_gguf(paths["llm"]) and not os.path.isfile(os.path.join(paths["llm"], "tokenizer.model")):
            raise MissingWeights(f"missing weights:\n  tokenizer: {paths['llm']}/tokenizer.model  <- {URLS[preset]}")
        tokenizer = load_tokenizer(paths["llm"])
        llama = Llama.from_pretrained(paths["llm"], dtype=dtype, device=device, quant=quant)
        visual = VisionTransformer.from_pretrained(paths["vit"], vit_cfg, dtype=dtype, device=device)
        cfg = replace(cfg, vit=visual.config, ln_vision_eps=ln_eps or cfg.ln_vision_eps,
                      max_context=min(cfg.max_context, llama.cfg.max_seq_len))
        qf, ln_state = None, None
        if cfg.qformer is not None:
            qf, ln_state = QFormer.from_pretrained(paths["qformer"], qf_cfg, dtype=dtype, device=device)
            cfg = replace(cfg, qformer=qf.config)
        with torch.device(device):
            m = cls(cfg, visual, qf, llama, tokenizer)  # llama_proj: nn.Linear's default init, fp32
        if ln_state is not None:  # llama2 (and no_qformer): not loaded from anything (the original never does)
            m.ln_vision.load_state_dict(ln_state)
        if proj is not False:
            m.load_projection(paths["proj"])
        return m.eval()

    # -------------------------------------------------------------------------------- the trained part
    @property
    def ablation(self):
        """This model's Table 5 switches (what a train.py checkpoint records)."""
        return dict(no_qformer=self.Qformer is None and self.cfg.variant == "vicuna0",
                    proj_layers=self.cfg.proj_layers, train_qformer=self.cfg.train_qformer)

    def trainable_state_dict(self):
        """What training saves as {"model": this}: llama_proj.* in fp32 (+ Qformer.* with a finetuned Q-Former)."""
        return {k: p.detach().float().cpu().clone() for k, p in self.named_parameters() if p.requires_grad}

    def reset_projection(self):
        """A fresh projection: nn.Linear's default init, from the current torch seed."""
        for m in self.llama_proj.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def load_projection(self, path):
        """The trained parameters (llama_proj, + Qformer with train_qformer) from a checkpoint; keys and shapes checked."""
        sd = unwrap(read_checkpoint(path), path)
        params = {k: p for k, p in self.named_parameters() if p.requires_grad}
        if set(sd) != set(params):
            raise CheckpointError(f"{path}: expected exactly the keys {sorted(params)[:6]} (a MiniGPT-4 projection "
                                  f"checkpoint{'' if len(params) == 2 else ' of this ablation'}), found {sorted(sd)[:6]}")
        for k, t in sd.items():  # the trained weights: floating point and finite, or refused
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise CheckpointError(f"{path}: {k} must hold finite floating-point values ({t.dtype})")
        first = next(m for m in self.llama_proj.modules() if isinstance(m, nn.Linear))
        key = "llama_proj.weight" if first is self.llama_proj else "llama_proj.0.weight"
        w, b, (out_dim, in_dim) = sd[key], sd[key[:-6] + "bias"], first.weight.shape
        if w.dim() != 2 or w.shape[0] != out_dim or tuple(b.shape) != (w.shape[0],):
            raise CheckpointError(f"{path}: projection outputs {w.shape[0]} but the LLM is {out_dim} wide (7B: 4096, "
                                  "13B: 5120): use the projection trained for this LLM")
        if w.shape[1] != in_dim:
            hint = ("a Vicuna (Q-Former) projection" if self.Qformer is None
                    else "a Llama-2 / no_qformer (4 grouped ViT tokens) projection")
            raise CheckpointError(f"{path}: projection takes {w.shape[1]}-wide inputs ({hint}?) but "
                                  f"the {self.cfg.variant} variant feeds it {in_dim}")
        for k, p in params.items():
            if sd[k].shape != p.shape:
                raise CheckpointError(f"{path}: {k} has shape {tuple(sd[k].shape)}, the model {tuple(p.shape)}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(sd[k])

    # ---------------------------------------------------------------------------------------- image side
    def encode_img(self, pixels):
        """pixels (B, 3, H, W) -> img_embeds (B, nq, D) in the LLM dtype, atts (B, nq) ones."""
        frozen = not any(p.requires_grad for p in self.visual_encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            x = self.visual_encoder(pixels)  # (B, 1 + N, W)
            x = self.ln_vision(x.float()).to(x.dtype)  # ln_vision (kept fp32) in fp32, cast back
        if self.Qformer is not None:  # a graph only where its parameters are trained (train_qformer)
            x = self.Qformer(x)  # (B, nq, H)
        else:
            B, N, W = x[:, 1:].shape  # drop CLS; 4 consecutive patch tokens -> one (row-major)
            x = x[:, 1:].reshape(B, N // self.cfg.group, W * self.cfg.group)  # (B, N/4, 4W)
        x = self.llama_proj(x.to(next(self.llama_proj.parameters()).dtype))  # (B, nq, D)
        emb = x.to(self.llama_model.model.embed_tokens.weight.dtype)
        return emb, torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)

    # -------------------------------------------------------------------------------------- text side
    @property
    def pad_id(self):
        return self.tokenizer.eos_id if self.cfg.pad_piece is None else self.tokenizer.piece_to_id(self.cfg.pad_piece)

    def embed(self, ids):  # list of ids -> (1, T, D)
        dev = self.llama_model.model.embed_tokens.weight.device
        return self.llama_model.embed(torch.tensor([ids], dtype=torch.long, device=dev))

    def tokenize_segments(self, text, bos=True):
        """Split at <ImageHere>; encode each piece on its own, bos on the first only (Chat.get_context_emb)."""
        return [self.tokenizer.encode(seg, bos=bos and i == 0) for i, seg in enumerate(text.split(IMAGE))]

    def splice(self, text, images, bos=True):
        """Prompt text with one <ImageHere> per image (each (nq, D)) -> embeds (1, L, D)."""
        segs = self.tokenize_segments(text, bos)
        if len(segs) != len(images) + 1:
            raise ValueError(f"the prompt has {len(segs) - 1} {IMAGE} placeholder(s) for {len(images)} image(s)")
        parts = [self.embed(segs[0])]
        for img, ids in zip(images, segs[1:]):
            parts += [img[None], self.embed(ids)]
        return torch.cat(parts, dim=1)

    def build_inputs(self, img_embeds, texts, prompts=None, end_sym=None, max_txt_len=None):
        """The original's training batch, right-padded: [bos][template(prompt) with image][text + end_sym][pad] ->
        inputs_embeds (B, T, D), attention_mask (B, T), labels (B, T): -100 on bos/prompt/image/pad and on text ids
        equal to the pad id (vicuna0 pads with eos: its eos targets are masked too). One host->device copy."""
        (B, nq, D), stage = img_embeds.shape, int(prompts is not None)
        prompts = [prompts] * B if isinstance(prompts, str) else prompts
        for name, items in (("prompts", prompts), ("texts", texts)):
            if items is not None and len(items) != B:
                raise ValueError(f"{len(items)} {name} for {B} images")
        end_sym = self.cfg.end_sym[stage] if end_sym is None else end_sym
        max_txt_len = self.cfg.max_txt_len[stage] if max_txt_len is None else max_txt_len
        bos, pad, IMG = self.tokenizer.bos_id, self.pad_id, -1  # IMG: a slot for one image embedding
        rows = []
        for b in range(B):
            before, after = [], []
            if prompts is not None:
                prompt = self.cfg.prompt_template.format(prompts[b])
                if prompt.count(IMAGE) != 1:
                    raise ValueError(f"prompt {prompts[b]!r} must hold exactly one {IMAGE}")
                before, after = self.tokenize_segments(prompt, bos=False)
            text = self.tokenizer.encode(texts[b] + end_sym)[:max_txt_len]  # truncated before padding
            rows.append(([bos] + before + [IMG] * nq + after, text))
        T = max(len(cond) + len(text) for cond, text in rows)  # rows are packed: pad only after each one's text
        ids, mask, labels = [], [], []
        for cond, text in rows:
            n = len(cond) + len(text)
            ids.append(cond + text + [pad] * (T - n))
            mask.append([1] * n + [0] * (T - n))
            labels.append([-100] * len(cond) + [i if i != pad else -100 for i in text] + [-100] * (T - n))
        dev = self.llama_model.model.embed_tokens.weight.device
        ids, mask, labels = torch.tensor([ids, mask, labels]).to(dev)  # one host -> device copy, (B, T) each
        image = ids == IMG
        emb = self.llama_model.embed(ids.masked_fill(image, pad))  # (B, T, D)
        emb[image] = img_embeds.reshape(B * nq, D).to(emb.dtype)
        return emb, mask, labels

    def lm_loss(self, inputs_embeds, attention_mask, labels):
        """-> (mean cross-entropy over the N target tokens, their logits (N, V) fp32, row-major): HF's shift
        by one, but the LM head runs only where a target follows (never the (B, T, V) logits)."""
        target = labels[:, 1:] != -100  # (B, T - 1): position t predicts labels[t + 1]
        logits = self.llama_model(embeds=inputs_embeds, mask=attention_mask, logits_at=F.pad(target, (0, 1)))
        return F.cross_entropy(logits, labels[:, 1:][target]), logits

    def forward(self, pixels, texts, prompts=None, end_sym=None, max_txt_len=None):
        """Training loss. Stage 1: prompts=None. Stage 2: one instruction (with <ImageHere>) for the batch
        or one per sample; the model applies its template. -> scalar loss."""
        img_embeds, _ = self.encode_img(pixels)
        return self.lm_loss(*self.build_inputs(img_embeds, texts, prompts, end_sym, max_txt_len))[0]

    # ---------------------------------------------------------------------------------------- generation
    def generate(self, embeds, mask=None, cache=None, max_new_tokens=300, num_beams=1, do_sample=True,
                 temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=None, length_penalty=1.0, stop=None,
                 on_text=None, generator=None, return_scores=False, original=True):
        """Decode from embeds (B, T, D) right-padded by mask -> generate.Generation. original=True mimics
        transformers 4.28/4.30 given only inputs_embeds: input_ids start at [bos], so bos is repetition-penalised
        and counts in the beam length (see beam_search). top_k 50: those versions' default, as the original."""
        rp = self.cfg.repetition_penalty if repetition_penalty is None else repetition_penalty
        start = torch.full((len(embeds), 1), self.tokenizer.bos_id, device=embeds.device) if original else None
        stop = self.cfg.stop if stop is None else stop
        if num_beams > 1:
            return beam_search(self.llama_model, embeds, mask, num_beams, max_new_tokens, rp, length_penalty,
                               start, self.tokenizer, stop, do_sample, temperature, top_k, top_p, generator)
        return generate(self.llama_model, embeds=embeds, mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=rp, penalty_ids=start,
                        eos_id=self.tokenizer.eos_id, pad_id=self.pad_id, stop=stop, tokenizer=self.tokenizer,
                        on_text=on_text, cache=cache, return_scores=return_scores, generator=generator)

    def clean_answer(self, ids):
        """Chat.answer's clean-up: drop a leading unk/bos, decode, cut at '###', after 'Assistant:', strip."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        for special in (self.tokenizer.unk_id, self.tokenizer.bos_id):  # in this order, as the original
            ids = ids[1:] if ids and ids[0] == special else ids
        text = self.tokenizer.decode(ids)
        for s in self.cfg.stop:
            text = text.split(s)[0]
        return text.split("Assistant:")[-1].strip()

    @torch.no_grad()
    def answer(self, img_embeds, questions, **opts):
        """One-shot, batched: image b (nq, D) + questions[b] -> list of answers (each row stops on its own)."""
        first_turn = self.cfg.chat_template.first_turn
        rows = [self.splice(first_turn(q), [img])[0] for img, q in zip(img_embeds, questions)]
        emb = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # (B, T, D), right-padded
        mask = nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.bool) for r in rows], True).to(emb.device)
        gen = self.generate(emb, mask, **opts)
        return [self.clean_answer(gen.ids[b, :gen.lengths[b]]) for b in range(len(rows))]
