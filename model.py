"""
Qwen2 / Qwen2.5 / Qwen3 dense decoder, loaded from (and saved to) a Hugging Face checkpoint folder
(its files are read and written by hf_files.py).

    model = Qwen.from_pretrained("Qwen3-0.6B", device="cuda", dtype=torch.bfloat16)
    logits = model(input_ids, positions, layout, kv_cache)          # (B, T, vocab)
    logp = model(input_ids, positions, layout, targets=targets)     # (B, T) log-probs, chunked

- Architecture only from config.json (old and new key spellings). Qwen2: q/k/v biases;
  Qwen3: per-head RMSNorm on q and k, explicit head_dim. GQA, tied or untied embeddings.
- Module paths equal the HF tensor names, so loading is one strict load_state_dict on a model
  built on the meta device (assign=True): each tensor goes from the file to its dtype and device.
- Positions (RoPE) and the branch layout (parallel_attention.Layout) are explicit arguments:
  NPR branches share positions, so positions are NOT derived from token order.
"""
import json
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_files import DTYPES, SUPPORTED, check_fields, dtype_name, load_safetensors, read_config, write_safetensors
from parallel_attention import attention


@dataclass
class QwenConfig:
    arch: str                 # "qwen2" or "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool            # Qwen2: True; Qwen3: config.attention_bias (False in released models)
    qk_norm: bool             # Qwen3 only
    dtype: torch.dtype
    raw: dict = field(default_factory=dict, repr=False)  # the whole config.json, written back on save

    @staticmethod
    def from_dict(d):
        """From config.json's fields, checked first (hf_files.check_fields: types, and what is supported).
        transformers 5 writes rope_parameters.rope_theta and dtype; 4.x rope_theta and torch_dtype."""
        check_fields(d)
        arch = next((SUPPORTED[a] for a in d.get("architectures") or [] if a in SUPPORTED), d.get("model_type"))
        theta = (d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta", 10000.0))
        heads = d["num_attention_heads"]
        return QwenConfig(
            arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads", heads),
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=True if arch == "qwen2" else bool(d.get("attention_bias", False)),
            qk_norm=arch == "qwen3", dtype=DTYPES[dtype_name(d) or "float32"], raw=dict(d))

    def to_dict(self):
        """config.json content: the original keys, updated with what may have changed."""
        dtype_name = {v: k for k, v in DTYPES.items()}[self.dtype]
        d = dict(self.raw, vocab_size=self.vocab_size, tie_word_embeddings=self.tie_word_embeddings,
                 torch_dtype=dtype_name, dtype=dtype_name)
        d.setdefault("architectures", [{v: k for k, v in SUPPORTED.items()}[self.arch]])
        d.setdefault("model_type", self.arch)
        return d


# -----------------------------------------------------------------------------
# The modules (attribute names follow the HF checkpoint exactly)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # as HF: normalise in fp32, scale in the input dtype
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """HF's half-split RoPE tables for explicit positions (B, T) -> cos, sin (B, T, head_dim), made in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq                    # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, H, T, D); cos/sin (B, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: QwenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, layout, kv_cache, attn_impl):
        return self.attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), cos, sin, layout, kv_cache, attn_impl)

    def attend(self, q, k, v, cos, sin, layout, kv_cache, attn_impl):
        """The layer after its q/k/v projections (B, T, H * D): norms, RoPE, the cache, attention and
        the output projection (a method of its own: decode_graph.py projects with one fused GEMM)."""
        B, T, _ = q.shape
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))   # (B, T, H, D)
        if self.qk_norm:  # Qwen3: RMSNorm over head_dim, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)                  # (B, Hkv, S, D)
            y = attention(q, k, v, layout, kv_cache.k_layout, impl=attn_impl)
        elif layout is None:  # plain causal (no branches): SDPA's own causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_head != self.n_kv)
        else:
            y = attention(q, k, v, layout, impl=attn_impl)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, layout, kv_cache, attn_impl):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, kv_cache, attn_impl)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(   # the checkpoint's `model.` prefix
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.attn_impl = "auto"             # parallel_attention.attention: auto | triton | sdpa | ref
        self.gradient_checkpointing = False

    @property
    def output_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def hidden_states(self, input_ids, positions=None, layout=None, kv_cache=None):
        """(B, T) ids -> (B, T, hidden) after the final norm. layout None: plain causal; kv_cache: the
        new tokens go to the slots layout.slot."""
        B, T = input_ids.shape
        if kv_cache is not None:
            if positions is None or layout is None or layout.slot is None:
                raise ValueError("with a kv_cache, give positions and a layout whose slot says which "
                                 "cache slot each token takes")
            kv_cache.write_layout(layout)           # and sets kv_cache.k_layout, the keys' layout
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, layout, kv_cache, self.attn_impl,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout, kv_cache, self.attn_impl)
        return self.model.norm(x)

    def forward(self, input_ids, positions=None, layout=None, kv_cache=None, targets=None, chunk_size=2048,
                with_entropy=False):
        """-> logits (B, T, vocab); given targets, the per-token log-probs (B, T) instead (and the
        entropies), computed in chunks inside forward so that DDP/FSDP hooks see one ordinary call."""
        h = self.hidden_states(input_ids, positions, layout, kv_cache)
        if targets is None:
            return F.linear(h, self.output_weight)
        return chunked_logprobs(h, self.output_weight, targets, chunk_size, with_entropy)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # ---- loading and saving (the HF layout) ---------------------------------------------------
    @staticmethod
    def from_pretrained(path, device="cpu", dtype=None):
        cfg = QwenConfig.from_dict(read_config(path))      # read_config names the file of a bad field
        cfg.dtype = dtype or cfg.dtype
        with torch.device("meta"):
            model = Qwen(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state = load_safetensors(path, cfg.dtype, device, expected)
        model.load_state_dict(state, strict=True, assign=True)
        return model.eval()

    def save_pretrained(self, path, max_shard_bytes=4 << 30, state_dict=None, dtype=None):
        """config.json + model.safetensors (or shards + index json) that transformers loads too.
        state_dict: full tensors when the model is sharded (FSDP gathers them on every rank);
        dtype: the dtype to write floating-point tensors in (None: as they are)."""
        os.makedirs(path, exist_ok=True)
        state = {k: v.detach().to("cpu", dtype if dtype and v.is_floating_point() else v.dtype).contiguous()
                 for k, v in (state_dict or self.state_dict()).items()}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(replace(self.config, dtype=next(iter(state.values())).dtype).to_dict(), f, indent=2)
        write_safetensors(state, path, max_shard_bytes)

# -----------------------------------------------------------------------------
# Log-probs without (T, vocab) logits, and the vocabulary

def chunked_logprobs(h, W, targets, chunk_size=2048, with_entropy=False):
    """log softmax(h @ W.T) at the targets (negative targets: 0), chunk_size tokens (all rows) x vocab
    at a time; under autograd each chunk is recomputed in backward instead of kept. with_entropy:
    also the entropy of each token's distribution (detached)."""
    def chunk_fn(h_c, t_c):
        logits = F.linear(h_c, W).float()                                      # (B, c, V)
        logz = torch.logsumexp(logits, dim=-1)
        lp = logits.gather(-1, t_c[..., None]).squeeze(-1) - logz
        ent = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1) if with_entropy else lp  # logZ - E[logit]
        return lp, ent

    step, safe_t = max(1, chunk_size // h.shape[0]), targets.clamp(min=0)
    grad = torch.is_grad_enabled() and h.requires_grad
    run = (lambda *a: torch.utils.checkpoint.checkpoint(chunk_fn, *a, use_reentrant=False)) if grad else chunk_fn
    lps, ents = zip(*(run(h[:, s:s + step], safe_t[:, s:s + step]) for s in range(0, h.shape[1], step)))
    logp = torch.cat(lps, 1).masked_fill(targets < 0, 0.0)
    return (logp, torch.cat(ents, 1).detach().masked_fill(targets < 0, 0.0)) if with_entropy else logp


@torch.no_grad()
def add_tag_tokens(model, tokenizer, names: dict):
    """Add each key of `names` (e.g. "<step>") as one added token (not special: decoding with
    skip_special_tokens=True keeps it, as for Qwen's <think>); a new token's embedding row (and
    untied lm_head row) is the mean of the rows of the sub-tokens of its name ("step"). The matrices
    grow when an id falls past them; tokens already in the vocabulary keep their rows. -> the ids."""
    sub_ids = {t: tokenizer.encode(names[t]) for t in names if tokenizer.token_to_id(t) is None}  # before adding
    ids = tokenizer.add_tokens(list(names))
    cfg = model.config
    new_vocab = max(cfg.vocab_size, max(ids) + 1)
    if new_vocab > cfg.vocab_size:
        emb = model.model.embed_tokens
        grown = nn.Embedding(new_vocab, cfg.hidden_size, device=emb.weight.device, dtype=emb.weight.dtype)
        grown.weight[:cfg.vocab_size] = emb.weight
        model.model.embed_tokens = grown
        if not cfg.tie_word_embeddings:
            head = nn.Linear(cfg.hidden_size, new_vocab, bias=False, device=emb.weight.device,
                             dtype=model.lm_head.weight.dtype)
            head.weight[:cfg.vocab_size] = model.lm_head.weight
            model.lm_head = head
        cfg.vocab_size = new_vocab
    mats = [model.model.embed_tokens.weight] + ([] if cfg.tie_word_embeddings else [model.lm_head.weight])
    for tok, i in zip(names, ids):
        for W in mats if tok in sub_ids else []:
            W[i] = W[sub_ids[tok]].float().mean(0).to(W.dtype)
    return ids
