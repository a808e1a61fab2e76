"""model.py against transformers (the oracle) on tiny random checkpoints written in the test.

Invariants held here:
- fp32 logits equal transformers' bit for bit (Qwen2 with biases, Qwen3 with q/k norms and an explicit
  head_dim, single-file and sharded safetensors); our saves load in transformers and back, bit for bit;
- loading is strict and its errors name the file, the field or the tensors; both config spellings;
- the branch layout: a branch is blind to its siblings, packed documents do not see each other, a
  layout without blocks is plain causal, the KV cache (interleaved slots) == the full forward;
- chunked log-probs (and entropies, and their gradients) == the full log-softmax; gradient
  checkpointing changes no gradient; tag tokens get mean-initialised rows and survive a save.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_model.py -q
"""
import json
import os
import re

import pytest
import torch

from model import Qwen, add_tag_tokens
from sampler import KVCache
from parallel_attention import Layout

transformers = pytest.importorskip("transformers")

VOCAB = 97


def hf_qwen2(**kw):
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   rope_theta=10000.0, initializer_range=0.2, **kw)
    return transformers.Qwen2ForCausalLM(cfg)


def hf_qwen3(**kw):
    # head_dim 24 != hidden/heads = 16; tied embeddings; q/k norms
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                   tie_word_embeddings=True, rope_theta=1e6, initializer_range=0.2, **kw)
    return transformers.Qwen3ForCausalLM(cfg)


def randomize_norms(m):
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: make them matter
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return m


def write(hf_model, path, **kw):
    torch.manual_seed(0)
    randomize_norms(hf_model).float().save_pretrained(path, safe_serialization=True, **kw)
    return hf_model.eval()


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(input_ids=ids).logits.float()


@pytest.mark.parametrize("make,shard", [(hf_qwen2, None), (hf_qwen3, None), (hf_qwen3, "20KB")])
def test_logits_parity_with_transformers(tmp_path, make, shard):
    torch.manual_seed(0)
    hf = write(make(), tmp_path, **({"max_shard_size": shard} if shard else {}))
    if shard:
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    ours = Qwen.from_pretrained(str(tmp_path), dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        a, b = ours(ids), hf_logits(hf, ids)
    assert torch.equal(a, b), (a - b).abs().max().item()   # same ops in the same order: bit for bit


@pytest.mark.parametrize("make", [hf_qwen2, hf_qwen3])
def test_save_round_trip_loads_in_transformers(tmp_path, make):
    torch.manual_seed(0)
    write(make(), tmp_path / "hf")
    ours = Qwen.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32)
    ours.save_pretrained(str(tmp_path / "ours"), max_shard_bytes=30_000)  # force shards
    assert os.path.isfile(tmp_path / "ours" / "model.safetensors.index.json")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32)
    again = Qwen.from_pretrained(str(tmp_path / "ours"))
    ids = torch.randint(0, VOCAB, (1, 17))
    with torch.no_grad():
        ref = ours(ids)
        assert torch.equal(hf_logits(back, ids), ref)
        assert torch.equal(again(ids), ref)


def test_loads_into_bf16_directly(tmp_path):
    write(hf_qwen3(), tmp_path)
    m = Qwen.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert m(torch.randint(0, VOCAB, (1, 5))).dtype == torch.bfloat16


def test_new_config_spellings(tmp_path):
    """transformers 5 writes rope_parameters.rope_theta and dtype; 4.x rope_theta and torch_dtype."""
    write(hf_qwen3(), tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.pop("rope_theta", None)
    cfg.pop("torch_dtype", None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6}
    cfg["dtype"] = "float32"
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    assert Qwen.from_pretrained(str(tmp_path)).config.rope_theta == 1e6
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 5e5
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    assert Qwen.from_pretrained(str(tmp_path)).config.rope_theta == 5e5


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Qwen.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        Qwen.from_pretrained(str(tmp_path))
    write(hf_qwen3(), tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    json.dump(dict(cfg, architectures=["LlamaForCausalLM"], model_type="llama"), open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="supported are Qwen2ForCausalLM"):
        Qwen.from_pretrained(str(tmp_path))
    json.dump(dict(cfg, num_hidden_layers=3), open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.2"):
        Qwen.from_pretrained(str(tmp_path))
    json.dump(dict(cfg, num_hidden_layers=1), open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.1"):
        Qwen.from_pretrained(str(tmp_path))
    json.dump(dict(cfg, intermediate_size=100), open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="shape mismatch: model.layers.0.mlp"):
        Qwen.from_pretrained(str(tmp_path))
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    weights = (tmp_path / "model.safetensors").read_bytes()
    for cut in (len(weights) // 2, 0):                                  # an interrupted download or save
        (tmp_path / "model.safetensors").write_bytes(weights[:cut])
        with pytest.raises(ValueError, match=r"model.safetensors: not a complete safetensors file"):
            Qwen.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Qwen.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"vocab_size": 97,\n "hidden_size": 64,,\n}')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(.*line 2"):
        Qwen.from_pretrained(str(tmp_path))
    json.dump({k: v for k, v in cfg.items() if k != "hidden_size"}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"config.json: required field 'hidden_size' is missing"):
        Qwen.from_pretrained(str(tmp_path))


BAD_CONFIGS = [  # (change to a valid config.json, the words of the error): each was a traceback or named no file
    (dict(num_hidden_layers="2"), 'num_hidden_layers must be a positive integer, got "2"'),
    (dict(num_hidden_layers=True), "num_hidden_layers must be a positive integer, got true"),
    (dict(hidden_size=-80), "hidden_size must be a positive integer, got -80"),
    (dict(vocab_size=97.5), "vocab_size must be a positive integer, got 97.5"),
    (dict(num_key_value_heads=3), "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
    (dict(head_dim=23), "head_dim must be even (RoPE rotates halves), got 23"),
    (dict(rope_theta="fast"), 'rope_theta must be a positive number, got "fast"'),
    (dict(rms_norm_eps="x"), 'rms_norm_eps must be a positive number, got "x"'),
    (dict(rope_parameters={"rope_theta": -1.0}), "rope_parameters.rope_theta must be a positive number, got -1.0"),
    (dict(rope_parameters="default"), 'rope_parameters must be an object, got "default"'),
    (dict(max_position_embeddings="4096"), 'max_position_embeddings must be a positive integer, got "4096"'),
    (dict(tie_word_embeddings="yes"), 'tie_word_embeddings must be true or false, got "yes"'),
    (dict(torch_dtype=["bfloat16"]), 'torch_dtype must be a string, got ["bfloat16"]'),
    (dict(torch_dtype="int8", dtype=None), "unsupported dtype 'int8' in config.json: float32, float16, bfloat16"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported RoPE scaling 'yarn'"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e6}), "unsupported RoPE scaling 'linear'"),
    (dict(use_sliding_window=True), "unsupported: use_sliding_window=true"),
    (dict(intermediate_size=None), "required field 'intermediate_size' is missing"),
]


@pytest.mark.parametrize("change,words", BAD_CONFIGS, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(BAD_CONFIGS)])
def test_config_fields_of_the_wrong_type_or_sign_are_refused_naming_the_field(tmp_path, change, words):
    write(hf_qwen3(), tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    json.dump({**cfg, **change}, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: {words}")):
        Qwen.from_pretrained(str(tmp_path))


def test_a_config_that_is_not_a_json_object_is_refused(tmp_path):
    import checkpoint
    write(hf_qwen3(), tmp_path)
    json.dump([json.load(open(tmp_path / "config.json"))], open(tmp_path / "config.json", "w"))
    for load in (Qwen.from_pretrained, lambda p: checkpoint.save_dtype(None, p)):
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: expected a JSON object, got a list")):
            load(str(tmp_path))


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("q3")
    torch.manual_seed(0)
    write(hf_qwen3(), path)
    return Qwen.from_pretrained(str(path), dtype=torch.float32)


def one_block_layout(lens=(3, 2, 4, 3, 2)):
    """prefix(3) | step1(2) step2(4) step3(3) | takeaway(2): block/branch/positions per NPR.md s3."""
    pre, s1, s2, s3, tk = lens
    branch = [0] * pre + [1] * s1 + [2] * s2 + [3] * s3 + [0] * tk
    block = [0] * pre + [1] * (s1 + s2 + s3 + tk)
    pos = list(range(pre)) + [pre + i for i in range(s1)] + [pre + i for i in range(s2)] \
        + [pre + i for i in range(s3)] + [pre + max(s1, s2, s3) + i for i in range(tk)]
    T = len(branch)
    t = lambda x: torch.tensor([x], dtype=torch.int32)
    return Layout(doc=torch.zeros(1, T, dtype=torch.int32), block=t(block), branch=t(branch)), t(pos).long()


@pytest.mark.parametrize("impl", ["sdpa", "ref", "triton"])
def test_branch_is_blind_to_siblings(qwen3, impl):
    qwen3.attn_impl = impl
    layout, pos = one_block_layout()
    br = layout.branch[0]
    ids = torch.randint(0, VOCAB, (1, br.numel()))
    ids2 = ids.clone()
    s2 = (br == 2).nonzero().flatten()
    ids2[0, s2] = (ids2[0, s2] + 1 + torch.randint(0, VOCAB - 1, (s2.numel(),))) % VOCAB  # change all of step 2
    with torch.no_grad():
        a, b = qwen3(ids, pos, layout), qwen3(ids2, pos, layout)
    qwen3.attn_impl = "auto"
    same = (br == 1) | (br == 3)
    same[:3] = True                                           # the prefix too
    assert (a[0, same] - b[0, same]).abs().max() <= 1e-5
    takeaway = torch.arange(br.numel()) >= br.numel() - 2
    assert (a[0, takeaway] - b[0, takeaway]).abs().max() > 1e-3


def test_layout_without_blocks_is_plain_causal(qwen3):
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        plain = qwen3(ids)
        for impl in ("sdpa", "ref"):
            qwen3.attn_impl = impl
            assert (qwen3(ids, None, Layout.causal(2, 19)) - plain).abs().max() <= 1e-5
    qwen3.attn_impl = "auto"


def test_packed_documents_do_not_see_each_other(qwen3):
    a, b = torch.randint(0, VOCAB, (1, 7)), torch.randint(0, VOCAB, (1, 9))
    ids = torch.cat([a, b], 1)
    doc = torch.tensor([[0] * 7 + [1] * 9], dtype=torch.int32)
    z = torch.zeros_like(doc)
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        packed = qwen3(ids, pos, Layout(doc, z, z))
        assert (packed[:, :7] - qwen3(a)).abs().max() <= 1e-5
        assert (packed[:, 7:] - qwen3(b)).abs().max() <= 1e-5


def test_kv_cache_equals_full_forward(qwen3):
    """Prefill 5 tokens, then decode one token per step into interleaved cache slots."""
    layout, pos = one_block_layout((3, 2, 2, 2, 2))
    T = pos.shape[1]
    ids = torch.randint(0, VOCAB, (1, T))
    with torch.no_grad():
        full = qwen3(ids, pos, layout)
        cache = KVCache(qwen3.config, 1, 32, dtype=torch.float32)
        # put the three branches interleaved in the cache: slot order != sequence order
        order = list(range(3)) + [3, 5, 7, 4, 6, 8] + [9, 10]   # token index written at each step
        slot_of = {tok: s for s, tok in enumerate(order)}
        got = torch.zeros_like(full)
        for tok in order:
            lay = Layout(layout.doc[:, [tok]], layout.block[:, [tok]], layout.branch[:, [tok]],
                         slot=torch.tensor([[slot_of[tok]]], dtype=torch.int32))
            got[:, tok] = qwen3(ids[:, [tok]], pos[:, [tok]], lay, cache)[:, 0]
    assert (got - full).abs().max() <= 1e-4


def test_gradient_checkpointing_changes_no_gradient(qwen3):
    layout, pos = one_block_layout()
    ids = torch.randint(0, VOCAB, (1, pos.shape[1]))
    targets = torch.roll(ids, -1, 1)
    grads = []
    qwen3.train()
    for ckpt in (False, True):
        qwen3.gradient_checkpointing = ckpt
        qwen3.zero_grad()
        qwen3(ids, pos, layout, targets=targets).sum().backward()
        grads.append([p.grad.clone() for p in qwen3.parameters()])
    qwen3.gradient_checkpointing = False
    qwen3.eval().zero_grad()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_kv_cache_needs_positions_and_slots(qwen3):
    layout, pos = one_block_layout()
    cache = KVCache(qwen3.config, 1, 32, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, pos.shape[1]))
    with pytest.raises(ValueError, match="slot"):
        qwen3(ids, pos, layout, cache)                          # no slots
    layout.slot = torch.arange(pos.shape[1], dtype=torch.int32)[None]
    with pytest.raises(ValueError, match="positions"):
        qwen3(ids, None, layout, cache)


def test_chunked_logprobs_equal_full(qwen3):
    ids = torch.randint(0, VOCAB, (2, 21))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    full = torch.log_softmax(qwen3(ids).float(), -1)
    ref = full[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    for chunk in (4, 7, 1024):
        lp, ent = qwen3(ids, targets=targets, chunk_size=chunk, with_entropy=True)
        assert (lp[:, :-1] - ref).abs().max() <= 1e-5 and (lp[:, -1] == 0).all()
        ref_ent = -(full.exp() * full).sum(-1)
        assert (ent[:, :-1] - ref_ent[:, :-1]).abs().max() <= 1e-4
    # gradients through the checkpointed chunks equal the plain ones
    qwen3.zero_grad()
    qwen3(ids, targets=targets, chunk_size=5).sum().backward()
    g1 = qwen3.model.layers[0].mlp.up_proj.weight.grad.clone()
    qwen3.zero_grad()
    ref_lp = torch.log_softmax(qwen3(ids).float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])
    ref_lp.sum().backward()
    assert (qwen3.model.layers[0].mlp.up_proj.weight.grad - g1).abs().max() <= 1e-4
    qwen3.zero_grad()


@pytest.mark.parametrize("tied", [True, False])
def test_add_tag_tokens_mean_init_and_reload(tmp_path, tied):
    from helpers import make_checkpoint
    from tokenizer import Tokenizer
    import npr
    model, tok = make_checkpoint(tmp_path / "base", tied=tied)
    V = model.config.vocab_size
    sub = {t: tok.encode(name) for t, name in npr.TAG_NAMES.items()}
    old = model.model.embed_tokens.weight.detach().clone()
    ids = add_tag_tokens(model, tok, npr.TAG_NAMES)
    assert len(set(ids)) == 8 and min(ids) >= V and model.config.vocab_size == V + 8
    for t, i in zip(npr.TAGS, ids):
        assert tok.encode(f"a {t} b").count(i) == 1                       # one id, also inside text
        assert torch.allclose(model.model.embed_tokens.weight[i], old[sub[t]].mean(0))
        if not tied:
            assert torch.allclose(model.lm_head.weight[i], model.lm_head.weight[sub[t]].mean(0))
    assert torch.equal(model.model.embed_tokens.weight[:V], old)         # old rows untouched
    model.save_pretrained(str(tmp_path / "tagged"))
    tok.save_pretrained(str(tmp_path / "tagged"))
    ours = Qwen.from_pretrained(str(tmp_path / "tagged"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "tagged"), dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "tagged"))
    text = "<guideline>\n<plan>1: x</plan>\n</guideline>\n<step>\n1: 2*3=6\n</step>"
    x = Tokenizer.from_pretrained(str(tmp_path / "tagged")).encode(text)
    assert x == hf_tok.encode(text, add_special_tokens=False)
    assert hf_tok.decode(x, skip_special_tokens=True) == text                 # tags are not special
    ids_t = torch.tensor([x])
    with torch.no_grad():
        assert torch.equal(ours(ids_t), hf(input_ids=ids_t).logits)
