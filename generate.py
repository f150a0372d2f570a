"""Decoding for llama.py's model (as gpt-fast keeps generate.py beside model.py): HF's logits processors,
`generate` (greedy / sampling, padded batches whose rows stop on their own, stop strings, streaming, a KV cache
that a chat can keep across turns) and `beam_search` (HF semantics, both the transformers 4.28/4.30 rules the
original MiniGPT-4 ran and those of transformers 5)."""
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from llama import KVCache


def process_logits(logits, seen=None, repetition_penalty=1.0, do_sample=False, temperature=1.0, top_k=None,
                   top_p=None, min_keep=1):
    """HF's processors in HF's order: repetition penalty on `seen` ids (B, V) bool; then, only when sampling,
    temperature, top-k, top-p (removed ids -> -inf, min_keep ids kept: beam search keeps 2). (B, V) -> (B, V)"""
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if not do_sample:
        return logits
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(max(top_k, min_keep), logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -min_keep:] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    return logits


class _RowText:
    """Text of row `row` as it grows, cut at the first stop string. Streams to on_text(row, delta) only what is
    final: holds back an incomplete multi-byte char and anything that could still start a stop string."""

    def __init__(self, tok, stops, on_text, row):
        self.tok, self.stops, self.on_text, self.row = tok, stops, on_text, row
        self.ids, self.sent, self.text, self.stopped = [], 0, "", False

    def push(self, token):
        self.ids.append(token)
        full = self.tok.decode(self.ids)
        cuts = [full.find(s) for s in self.stops if s in full]
        self.text, self.stopped = full[:min(cuts, default=len(full))], bool(cuts)
        self.stream(final=self.stopped)

    def stream(self, final=False):
        end = len(self.text)
        if not final:
            end = len(self.text.rstrip("\ufffd"))  # maybe an incomplete UTF-8 sequence
            for s in self.stops:  # hold a suffix that may become a stop string
                end -= max([n for n in range(1, len(s)) if self.text[:end].endswith(s[:n])], default=0)
        if self.on_text is not None and end > self.sent:
            self.on_text(self.row, self.text[self.sent:end])
        self.sent = max(self.sent, end)


@dataclass
class Generation:
    ids: torch.Tensor  # (B, n) new tokens; after a row finishes (eos / stop, included) it holds pad_id
    lengths: torch.Tensor  # (B,) tokens generated per row, the eos / stop tokens included
    cache: KVCache  # see generate()
    scores: Optional[torch.Tensor] = None  # (n, B, V) scores after the processors (return_scores=True)
    texts: Optional[list] = None  # decoded rows (tokenizer given), cut at the first stop string


def sample(probs, generator=None):
    """One id per row from probs (B, V): torch.multinomial(probs, 1)'s own method (argmax of p / Exp(1)
    noise, so the same draws for the same seed) without multinomial's host sync. -> (B,)"""
    return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(-1)


@torch.no_grad()
def generate(model, idx=None, embeds=None, mask=None, max_new_tokens=20, do_sample=False, temperature=1.0,
             top_k=None, top_p=None, repetition_penalty=1.0, penalty_ids=None, eos_id=2, pad_id=0, stop=(),
             tokenizer=None, on_text=None, cache=None, return_scores=False, generator=None, check_every=8):
    """Decode from ids `idx` (B, T) or `embeds` (B, T, C), right-padded by `mask`, as HF does: greedy unless
    do_sample; repetition penalty on a running `input_ids` seeded with `penalty_ids` (B, S) (default: idx's
    real ids; HF seeds [[bos]] for embeds). stop: token-id lists and/or strings (need `tokenizer`); rows stop
    on their own. on_text(row, delta): streamed text, the deltas join to texts[row]. cache: may hold a prefix;
    on return it holds prefix + prompt + each row's tokens but its last (never fed), then pad slots."""
    x = model.embed(idx) if embeds is None else embeds
    (B, T, _), dev = x.shape, x.device
    mask = torch.ones(B, T, dtype=torch.bool, device=dev) if mask is None else mask.to(dev).bool()
    cache = model.new_cache(B, T + max_new_tokens) if cache is None else cache
    if cache.pos + T + max_new_tokens - 1 > cache.max_len:
        raise ValueError(f"cache too small: {cache.pos} + {T} + {max_new_tokens - 1} > {cache.max_len}")
    seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=dev)  # running input_ids, as sets
    if penalty_ids is None and idx is not None:
        penalty_ids = torch.where(mask, idx, idx[:, :1])
    if penalty_ids is not None:
        seen.scatter_(1, torch.as_tensor(penalty_ids, device=dev).view(B, -1), True)
    id_stops = [torch.tensor(s, device=dev) for s in stop if not isinstance(s, str)]
    str_stops = [s for s in stop if isinstance(s, str)]
    rows = [_RowText(tokenizer, str_stops, on_text, b) for b in range(B)] if tokenizer is not None else None

    last = torch.arange(T, device=dev) == mask.sum(-1, keepdim=True) - 1  # (B, T): each row's last real token
    logits = model(embeds=x, mask=mask, cache=cache, logits_at=last)  # (B, V)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    scores_list = []
    for t in range(max_new_tokens):
        scores = process_logits(logits, seen, repetition_penalty, do_sample, temperature, top_k, top_p)
        if return_scores:
            scores_list.append(scores)
        next_tok = sample(scores.softmax(-1), generator) if do_sample else scores.argmax(-1)  # (B,)
        tok = torch.where(finished, pad_id, next_tok)  # a finished row stops changing
        out[:, t] = tok
        lengths += ~finished
        seen.scatter_(1, tok[:, None], True)
        done = tok == eos_id if eos_id is not None else torch.zeros_like(finished)
        for s in id_stops:
            if t + 1 >= len(s):
                done |= (out[:, t + 1 - len(s):t + 1] == s).all(-1)
        if rows is not None:  # text work: the tokens go to the host every step
            for row, token, fin in zip(rows, tok.tolist(), finished.tolist()):
                if not fin:
                    row.push(token)
                    done[row.row] |= row.stopped
        finished |= done
        if t == max_new_tokens - 1:
            break
        synced = rows is not None or (t + 1) % check_every == 0  # bool() waits for the GPU: not every step
        if synced and bool(finished.all()):
            break
        logits = model(idx=tok[:, None], mask=~finished[:, None], cache=cache)[:, -1]  # (B, V)
    for row in rows or []:
        row.stream(final=True)
    n = int(lengths.max())
    return Generation(out[:, :n], lengths, cache, torch.stack(scores_list)[:n] if return_scores else None,
                      [row.text for row in rows] if rows is not None else None)


# ----------------------------------------------------------------------------------------------- beam search
@torch.no_grad()
def beam_search(llm, embeds, mask, num_beams, max_new_tokens, repetition_penalty=1.0, length_penalty=1.0,
                start_ids=None, tokenizer=None, stop=(), do_sample=False, temperature=1.0, top_k=None, top_p=None,
                generator=None, eos_id=None):
    """HF beam search / beam sampling (early_stopping=False) on embeds (B, T, D) -> Generation of each row's best
    hypothesis (eos included). Each step keeps the 2K best (or sampled) continuations; those ending in eos (or a stop
    string) among the top K finish, scored sum_logprobs / length**length_penalty; the K best others run on.
    start_ids (B, S): transformers 4.28/4.30 (the original's input_ids start with them): hypothesis length S + tokens
    before the eos; warpers AFTER adding the beam scores; a row stops once it holds K hypotheses and the best
    candidate / (S + t)**lp cannot beat the worst; at the end the running beams join (length S + max_new_tokens).
    None: transformers 5.x: length = new tokens with the eos; warpers BEFORE the scores; the stop test uses the best
    running beam / (t + 1); at the end the top K candidates finish. For an eos both lengths agree when S = 1."""
    B, T, D = embeds.shape
    K, dev = num_beams, embeds.device
    eos = tokenizer.eos_id if eos_id is None else eos_id
    mask = torch.ones(B, T, dtype=torch.bool, device=dev) if mask is None else mask.bool()
    x, m = embeds.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)  # (B*K, T, D)
    cache = llm.new_cache(B * K, T + max_new_tokens)
    V = llm.cfg.vocab_size
    seen = torch.zeros(B * K, V, dtype=torch.bool, device=dev)
    hf4, S = start_ids is not None, 0 if start_ids is None else start_ids.shape[1]
    if hf4:  # transformers 4.28's input_ids: penalised like every later token
        seen.scatter_(1, start_ids.to(dev).repeat_interleave(K, 0), True)
    last = torch.arange(T, device=dev) == m.sum(-1, keepdim=True) - 1  # (B*K, T): each row's last real token
    logits = llm(embeds=x, mask=m, cache=cache, logits_at=last)  # (B*K, V)
    seqs = torch.zeros(B, K, 0, dtype=torch.long, device=dev)
    run_scores = torch.zeros(B, K, device=dev)
    run_scores[:, 1:] = -1e9  # only beam 0 expands at the first step
    done = [[] for _ in range(B)]  # finished (score, ids) per row, at most K kept

    def add(b, score, ids, length):
        done[b] = sorted(done[b] + [(score / length ** length_penalty, ids)], key=lambda h: -h[0])[:K]

    open_rows = [True] * B
    str_stops = [s for s in (stop or ()) if isinstance(s, str)]
    warp = functools.partial(process_logits, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p,
                             min_keep=2)  # HF's sampling warpers for beams keep at least 2 ids
    for t in range(max_new_tokens):
        logp = process_logits(F.log_softmax(logits, -1), seen, repetition_penalty)  # (B*K, V)
        if do_sample and not hf4:
            logp = warp(logp)
        total = logp.view(B, K, V) + run_scores[..., None]
        if do_sample and hf4:
            total = warp(total.view(B * K, V)).view(B, K, V)
        total = total.view(B, K * V)
        if do_sample:
            idx = torch.multinomial(total.softmax(-1), 2 * K, generator=generator)
            top, order = total.gather(1, idx).sort(-1, descending=True)
            idx = idx.gather(1, order)
        else:
            top, idx = total.topk(2 * K, dim=-1)  # (B, 2K)
        beam, tok = idx // V, idx % V
        cand = torch.cat([seqs.gather(1, beam[..., None].expand(-1, -1, t)), tok[..., None]], -1)  # (B, 2K, t+1)
        last = t == max_new_tokens - 1
        kept = []  # per row: (the beam each running beam comes from (K,), its ids (K, t+1), its score (K,))
        for b in range(B):
            keep = []
            for j in range(2 * K):
                ids = cand[b, j].tolist()
                fin = ids[-1] == eos or (str_stops and any(s in tokenizer.decode(ids) for s in str_stops))
                if fin or (last and not hf4):
                    if j < K and open_rows[b]:
                        add(b, top[b, j].item(), ids, S + t if hf4 and fin else t + 1)
                elif len(keep) < K:
                    keep.append(j)
            n_ok = len(keep)  # (rarely) fewer than K unfinished: fill with dead beams
            keep += [j for j in range(2 * K) if j not in keep][:K - n_ok]
            score = top[b, keep].clone()
            score[n_ok:] = -1e9
            kept.append((beam[b, keep], cand[b, keep], score))
            if len(done[b]) == K and open_rows[b]:  # can a running beam still beat the worst finished one?
                best = top[b, 0].item() / (S + t) ** length_penalty if hf4 else \
                    score[0].item() / (t + 1) ** length_penalty
                open_rows[b] = best > done[b][-1][0]
            if last and hf4 and open_rows[b]:  # transformers 4.28's finalize: the running beams join
                for j in range(n_ok):
                    add(b, score[j].item(), cand[b, keep[j]].tolist(), S + max_new_tokens)
        if last or not any(open_rows):
            break
        beam_idx, seqs, run_scores = (torch.stack(column) for column in zip(*kept))  # (B, K), (B, K, t+1), (B, K)
        flat = (beam_idx + torch.arange(B, device=dev)[:, None] * K).view(-1)
        cache.reorder(flat)
        seen = seen.index_select(0, flat)
        seen.scatter_(1, seqs[..., -1].reshape(-1, 1), True)
        logits = llm(idx=seqs[..., -1].reshape(-1, 1), cache=cache)[:, -1]
    best = [max(h, key=lambda h: h[0])[1] for h in done]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(h) for h in best], True, eos).to(dev)  # (B, n)
    texts = None
    if tokenizer is not None:  # each text cut at its earliest stop string
        texts = [min((t.split(s)[0] for s in str_stops), key=len, default=t) for t in map(tokenizer.decode, best)]
    return Generation(ids, torch.tensor([len(h) for h in best], device=dev), cache, None, texts)
