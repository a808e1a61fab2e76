"""
Qwen2 / Qwen2.5 / Qwen3 dense decoder, loaded from (and saved to) a Hugging Face checkpoint folder.

    model = Qwen.from_pretrained("Qwen3-0.6B", device="cuda", dtype=torch.bfloat16)
    logits = model(input_ids, positions, layout, kv_cache)       # (B, T, vocab)

- Architecture only from config.json (old and new key spellings). Qwen2: q/k/v biases;
  Qwen3: per-head RMSNorm on q and k, explicit head_dim. GQA, tied or untied embeddings.
- Module paths equal the HF tensor names, so loading is one strict load_state_dict on a model
  built on the meta device (assign=True): each tensor goes from the file straight to its dtype
  and device, never through a full fp32 copy.
- Positions (RoPE) and the branch layout (parallel_attention.Layout) are explicit arguments:
  NPR branches share positions, so positions are NOT derived from token order.
- model(ids, targets=...) gives per-token log-probs without materialising (T, vocab) logits.
"""
import json
import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from parallel_attention import Layout, attention

SUPPORTED = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
        archs = d.get("architectures") or []
        arch = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
        if arch is None and d.get("model_type") in SUPPORTED.values():
            arch = d["model_type"]
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or d.get('model_type')!r}: "
                             f"supported are {', '.join(SUPPORTED)} (dense Qwen2/2.5/3)")
        # transformers 5 writes rope_parameters.rope_theta and dtype; 4.x rope_theta and torch_dtype
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or ({} if "rope_type" not in rope else {"rope_type": rope["rope_type"]})
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", None):
            raise ValueError(f"unsupported RoPE scaling {kind!r}: only plain RoPE is implemented")
        if d.get("use_sliding_window"):
            raise ValueError("unsupported: use_sliding_window=true (sliding-window attention)")
        dtype_name = d.get("dtype") or d.get("torch_dtype") or "float32"
        if dtype_name not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype_name!r} in config.json: {', '.join(DTYPES)}")
        heads = d["num_attention_heads"]
        return QwenConfig(
            arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads", heads),
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=True if arch == "qwen2" else bool(d.get("attention_bias", False)),
            qk_norm=arch == "qwen3", dtype=DTYPES[dtype_name], raw=dict(d))

    def to_dict(self):
        """config.json content: the original keys, updated with what may have changed."""
        d = dict(self.raw)
        dtype_name = {v: k for k, v in DTYPES.items()}[self.dtype]
        d.update(vocab_size=self.vocab_size, tie_word_embeddings=self.tie_word_embeddings,
                 torch_dtype=dtype_name, dtype=dtype_name)
        d.setdefault("architectures", [{v: k for k, v in SUPPORTED.items()}[self.arch]])
        d.setdefault("model_type", self.arch)
        return d


# -----------------------------------------------------------------------------
# The modules (names follow the HF checkpoint exactly)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype  # HF computes the norm in fp32 and scales in the input dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """HF's half-split RoPE tables for explicit positions (B, T) -> cos, sin (B, T, head_dim)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64,
                                             device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq                    # (B, T, D/2), fp32
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x (B, H, T, D); cos/sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: QwenConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, layout, kv_cache, attn_impl, qkv=None):
        """qkv: optional (weight, bias) of q/k/v concatenated (decode_graph.fused_projections): one GEMM for three."""
        B, T, _ = x.shape
        if qkv is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = F.linear(x, *qkv).split([self.n_head * self.head_dim, self.n_kv * self.head_dim,
                                               self.n_kv * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm:  # Qwen3: RMSNorm over head_dim, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)                  # (B, Hkv, S, D)
            y = attention(q, k, v, layout, kv_cache.k_layout, impl=attn_impl)
        elif layout is None:
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

    def forward(self, x, gate_up=None):
        if gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)       # decode_graph.fused_projections: one GEMM for two
        return self.down_proj(F.silu(g) * u)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, layout, kv_cache, attn_impl, fused=None):
        qkv, gate_up = fused or (None, None)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, kv_cache, attn_impl, qkv)
        return x + self.mlp(self.post_attention_layernorm(x), gate_up)


class QwenBody(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, layers, final norm."""
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen(nn.Module):
    def __init__(self, cfg: QwenConfig):
        super().__init__()
        self.config = cfg
        self.model = QwenBody(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.attn_impl = "auto"             # parallel_attention dispatcher: auto | triton | sdpa | ref
        self.gradient_checkpointing = False

    @property
    def output_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def hidden_states(self, input_ids, positions=None, layout=None, kv_cache=None, fused=None):
        """(B, T) ids -> (B, T, hidden) after the final norm. fused: decode_graph.fused_projections(self), optional
        (inference: fewer, larger GEMMs)."""
        B, T = input_ids.shape
        if positions is None:
            if kv_cache is not None:
                raise ValueError("with a kv_cache, positions must be given explicitly")
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        if kv_cache is not None:
            if layout is None or layout.slot is None:
                raise ValueError("with a kv_cache, layout.slot must say which cache slot each token takes")
            kv_cache.write_layout(layout)
            kv_cache.k_layout = kv_cache.layout()   # one object for all layers (their masks are memoised on it)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, layout, kv_cache, self.attn_impl,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout, kv_cache, self.attn_impl, fused[layer.self_attn.layer_idx] if fused else None)
        return self.model.norm(x)

    def forward(self, input_ids, positions=None, layout=None, kv_cache=None, targets=None, chunk_size=2048,
                with_entropy=False):
        """-> logits (B, T, vocab); given targets, the per-token log-probs (B, T) instead, computed
        in chunks (inside forward, so DDP/FSDP hooks see one ordinary forward call)."""
        h = self.hidden_states(input_ids, positions, layout, kv_cache)
        if targets is None:
            return F.linear(h, self.output_weight)
        return chunked_logprobs(h, self.output_weight, targets, chunk_size, with_entropy)

    # ---- loading and saving ---------------------------------------------------------------
    @staticmethod
    def from_pretrained(path, device="cpu", dtype=None):
        try:
            cfg = QwenConfig.from_dict(read_config(path))
        except KeyError as e:
            raise ValueError(f"{os.path.join(path, 'config.json')}: required field {e.args[0]!r} is missing") from None
        if dtype is not None:
            cfg.dtype = dtype
        with torch.device("meta"):
            model = Qwen(cfg)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state = load_safetensors(path, cfg.dtype, device)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:  # harmless duplicate of the embedding
            unexpected.remove("lm_head.weight")
            del state["lm_head.weight"]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the {cfg.arch} config: "
                             f"missing tensors {missing[:20]}{' ...' if len(missing) > 20 else ''}, "
                             f"unexpected tensors {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
        bad = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(s)}" for k, s in expected.items()
               if tuple(state[k].shape) != tuple(s)]
        if bad:
            raise ValueError(f"checkpoint {path}: shape mismatch: " + "; ".join(bad[:20]))
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
        shards, cur, size = [], {}, 0
        for k, v in state.items():
            nbytes = v.numel() * v.element_size()
            if cur and size + nbytes > max_shard_bytes:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = v
            size += nbytes
        shards.append(cur)
        for old in os.listdir(path):  # stale weights from an earlier save would shadow the new ones
            if old.startswith("model") and (old.endswith(".safetensors") or old.endswith(".index.json")):
                os.remove(os.path.join(path, old))
        if len(shards) == 1:
            save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


def read_config(path):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in checkpoint folder {path}")
    return read_json(cfg_path)


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError (with its line and column), UnicodeDecodeError
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_safetensors(path, dtype, device):
    """All tensors of a single-file or sharded checkpoint, each cast to dtype on device as it is read."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
    elif os.path.isfile(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        found = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".safetensors")))
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}"
                                + (f" (found {found}: only safetensors are supported)" if found else ""))
    state = {}
    for name in files:
        fp = os.path.join(path, name)
        if not os.path.isfile(fp):
            raise FileNotFoundError(f"shard {name} listed in the index is missing from {path}")
        try:
            with safe_open(fp, framework="pt", device=str(device)) as f:
                for k in f.keys():
                    state[k] = f.get_tensor(k).to(dtype)
        except SafetensorError as e:
            raise ValueError(f"{fp}: not a complete safetensors file ({e}): an interrupted download or save?") from None
    return state


# -----------------------------------------------------------------------------
# Log-probs without (T, vocab) logits, and growing the vocabulary for the tag tokens

def chunked_logprobs(h, W, targets, chunk_size=2048, with_entropy=False):
    """h (B, T, hidden) @ W.T -> gathered log-probs, one block of chunk_size tokens (all rows) x vocab at a time. Under
    autograd each chunk is checkpointed: backward recomputes it instead of keeping all alive."""
    valid = targets >= 0
    safe_t = targets.clamp(min=0)

    def chunk_fn(h_c, t_c):
        logits = F.linear(h_c, W).float()                                      # (B, c, V)
        logz = torch.logsumexp(logits, dim=-1)
        lp = logits.gather(-1, t_c[..., None]).squeeze(-1) - logz
        if not with_entropy:
            return lp, lp
        p = torch.softmax(logits, dim=-1)
        return lp, logz - (p * logits).sum(-1)                                 # entropy = logZ - E[logit]

    lps, ents = [], []
    step = max(1, chunk_size // h.shape[0])                                    # chunk_size counts tokens of all rows
    for s in range(0, h.shape[1], step):
        args = (h[:, s:s + step], safe_t[:, s:s + step])
        if torch.is_grad_enabled() and h.requires_grad:
            lp, ent = torch.utils.checkpoint.checkpoint(chunk_fn, *args, use_reentrant=False)
        else:
            lp, ent = chunk_fn(*args)
        lps.append(lp)
        ents.append(ent)
    logp = torch.cat(lps, 1).masked_fill(~valid, 0.0)
    if with_entropy:
        return logp, torch.cat(ents, 1).detach().masked_fill(~valid, 0.0)
    return logp


def check_vocab(model, tokenizer, where=""):
    """Every token id needs an embedding row: a tokenizer from another checkpoint would index past
    the matrix mid-run (CUDA: a device-side assert). More rows than ids is normal: Qwen's files
    have 151936 rows for 151669 ids."""
    n_ids = max(tokenizer._tk.get_vocab(with_added_tokens=True).values()) + 1
    if n_ids > model.config.vocab_size:
        raise ValueError(f"{where + ': ' if where else ''}the tokenizer has {n_ids} ids but the model only "
                         f"{model.config.vocab_size} embedding rows (config.json vocab_size): tokenizer and "
                         "weights from different checkpoints?")


@torch.no_grad()
def add_tag_tokens(model, tokenizer, names: dict):
    """Add each key of `names` (e.g. "<step>") as one added token (not special: decoding with
    skip_special_tokens=True keeps it, as for Qwen's <think>); initialise its embedding row
    (and untied lm_head row) to the mean of the rows of the sub-tokens of its name ("step").
    Grows the matrices when an id falls past the current vocab (Qwen's files have spare rows:
    151936 rows for 151669 ids). Tokens already in the vocabulary keep their rows. Returns the ids."""
    fresh = [t for t in names if tokenizer.token_to_id(t) is None]         # existing ones keep their rows
    sub_ids = {tok: tokenizer.encode(names[tok]) for tok in fresh}          # before adding: plain text
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
        if tok not in sub_ids:
            continue
        for W in mats:
            W[i] = W[sub_ids[tok]].float().mean(0).to(W.dtype)
    return ids
