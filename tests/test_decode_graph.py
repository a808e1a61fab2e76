"""The sampler's fast decode step (decode_graph.py): padded static shapes (CPU: run eagerly) and
CUDA graphs (GPU) give the same tokens and log-probs as the ordinary eager step; the in-step draw
equals the sampler's; the KV-cache budget bounds the rows. The CUDA cases run under `bash gpu_check.sh`.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_decode_graph.py (~15 s)."""
import pytest
import torch

from decode_graph import StaticStep
from helpers import Script, block_script, chat, check_exact, ids_of, make_checkpoint, step_script
from sampler import Sampler, SamplingParams

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def run(model, tok, mode, prompts, params, steer=None, seeds=None, sampler=None):
    sampler = sampler or Sampler(model, tok)
    sampler.step_mode = mode
    return [s for o in sampler.generate(prompts, params=params, steer=steer, seeds=seeds) for s in o]


def same(a, b, tol):
    assert [s.ids for s in a] == [s.ids for s in b]
    assert [(s.block, s.branch, s.pos, s.sampled, s.finish_reason) for s in a] == \
           [(s.block, s.branch, s.pos, s.sampled, s.finish_reason) for s in b]
    diff = max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s.logprobs, t.logprobs))
    assert diff <= tol, diff


def workload(tok):
    """Rows that fork at different times and widths (grids of several widths) plus a free row."""
    prompts = [chat(tok, "a"), chat(tok, "a longer question"), chat(tok, "b")]
    trunks = {0: block_script(tok, ["1", "2"]),
              1: ids_of(tok, "Let me think. ") + block_script(tok, ["1", "2", "3", "4", "5"])}
    branches = {(0, 1, 1): step_script(tok, 1, "one"), (0, 1, 2): step_script(tok, 2, "two two two two")}
    branches.update({(1, 1, i): step_script(tok, i, "w" * (2 * i)) for i in range(1, 6)})
    return prompts, Script(trunks, branches)


def test_static_shapes_equal_eager_step(ck):
    """Padding the grid to a bucket and attending over a power-of-two span of the cache change
    nothing: same tokens (sampled at T=1 with the same seeds), same log-probs, exact vs teacher forcing."""
    model, tok = ck
    prompts, steer = workload(tok)
    p = SamplingParams(temperature=1.0, max_new_tokens=240)
    eager = run(model, tok, "eager", prompts, p, steer)
    static = run(model, tok, "static", prompts, p, steer)
    same(eager, static, 1e-4)
    assert [s.stats["branches_per_fork"] for s in static][:2] == [[2], [5]]
    for s in static[:2]:
        check_exact(model, tok, s)


def test_static_cache_reused_across_calls_and_spans_grow(ck):
    """A second generate() on the same rows reuses the cache (reset in place); a long serial run
    crosses several cache spans (256 -> 512 slots)."""
    model, tok = ck
    sampler = Sampler(model, tok)
    sampler.stop_ids = set()
    p = SamplingParams(mode="serial", temperature=0, max_new_tokens=300)
    prompts = [chat(tok, "x"), chat(tok, "y y")]
    first = run(model, tok, "static", prompts, p, sampler=sampler)
    fast = sampler.fast
    again = run(model, tok, "static", prompts, p, sampler=sampler)
    assert sampler.fast is fast                       # same cache object, reset in place
    run(model, tok, "static", [chat(tok, "x y z"), chat(tok, "y")], p, sampler=sampler)
    assert sampler.fast is fast                       # other prompt lengths, same capacity bucket
    eager = run(model, tok, "eager", prompts, p)
    same(eager, first, 1e-4)
    same(first, again, 0.0)
    assert fast.span(len(prompts[0]) + 300) > 256 and fast.span(10) == 256   # two spans were used


@pytest.mark.parametrize("step", ["static", pytest.param("graph", marks=[pytest.mark.cuda, cuda])])
@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_in_step_draw_equals_eager(ck, mode, step):
    """Unsteered sampling: the static step (CPU) or the CUDA graph draws the tokens itself (logits,
    top-k / top-p, the uniform of each cell, log-probs) and gives what the eager step's sampling gives."""
    import copy
    model, tok = ck
    model = copy.deepcopy(model).to("cuda" if step == "graph" else "cpu")
    with torch.no_grad():
        model.model.norm.weight.mul_(0.02)     # flat next-token distributions (the fixture's is peaked)
    prompts = [chat(tok, "a"), chat(tok, "a longer question")]
    for temperature, top_p, top_k in ((1.0, 1.0, 0), (0.7, 0.8, 0), (1.3, 1.0, 7), (0.0, 1.0, 0)):
        p = SamplingParams(mode=mode, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=60, seed=3)
        sampler = Sampler(model, tok)
        static = [s for o in sampler_run(sampler, step, prompts, p) for s in o]
        assert sampler.fast.draws > 50                 # the step drew (every step of this call)
        eager = [s for o in sampler_run(Sampler(model, tok), "eager", prompts, p) for s in o]
        same(eager, static, 1e-4)
        if temperature:
            assert len({tuple(s.ids) for s in static}) == 4          # the rows' draws differ


def test_in_step_draw_of_a_wide_grid(ck):
    """A (2, 4) grid (a fork's width): the step's own draw of every cell equals the head applied to
    the hidden states it returns without drawing, cell by cell (row-major cells, one uniform each)."""
    import copy
    from sampler import KVCache
    from sampler import draw_tokens
    model, tok = ck
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(0.02)
    grid = torch.tensor([[[5 + r + j, j, 0, 1, j + 1, j] for j in range(4)] for r in range(2)])
    grid[1, 3] = torch.tensor([0, 0, -1, 0, 0, 255])                   # a padding cell
    u = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
    for settings in ((1.0, 1.0, 0), (0.8, 0.9, 5)):
        fast = StaticStep(model, KVCache(model.config, 2, 256), graphs=False, draw_tokens=draw_tokens)
        toks, lps = fast(grid, 4, u, settings)
        fast.reset()
        h = fast(grid, 4).flatten(0, 1)
        logits = torch.nn.functional.linear(h, model.output_weight).float()
        want = draw_tokens(logits, *settings, u.flatten())
        assert toks.long().tolist() == want.tolist() and len(set(want.tolist())) > 4
        assert torch.allclose(lps.float(), logits.log_softmax(-1).gather(1, want[:, None])[:, 0], atol=1e-6)


def sampler_run(sampler, mode, prompts, p):
    sampler.step_mode = mode
    return sampler.generate(prompts, n=2, params=p)


def test_in_step_draw_only_when_nothing_edits_the_logits():
    from decode_graph import in_step_settings
    p = SamplingParams(temperature=0.7, top_p=0.9)
    assert in_step_settings([p, p], None) == (0.7, 0.9, 0)
    assert in_step_settings([SamplingParams(temperature=0), SamplingParams(temperature=0, top_p=0.5)], None) == (0.0, 1.0, 0)
    assert in_step_settings([p], steer=lambda r, x: x) is None                          # steering edits logits
    assert in_step_settings([SamplingParams(repetition_penalty=1.02)], None) is None     # so does the penalty
    assert in_step_settings([p, SamplingParams(temperature=1.0)], None) is None          # two settings: two groups


def test_buckets():
    class Cache:
        doc = torch.zeros(2, 3000)
    f = StaticStep(None, Cache(), graphs=False)
    assert [f.width(w) for w in (1, 2, 3, 5, 9, 64, 65)] == [1, 2, 4, 8, 16, 64, None]
    assert [f.span(x) for x in (1, 256, 257, 2049, 2999)] == [256, 256, 512, 3000, 3000]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("attn", ["triton", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_equals_eager(tmp_path, dtype, attn):
    """On a GPU: the captured graphs replay the eager static step (same kernels, same shapes), and
    match the ordinary eager step (fp32: within 1e-4; bf16: the padded shapes may round otherwise,
    so only the forced structures' tokens are compared)."""
    model, tok = make_checkpoint(tmp_path, tags_special=True)
    model = model.to("cuda", dtype)
    model.attn_impl = attn
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    prompts, steer = workload(tok)
    p = SamplingParams(temperature=1.0, max_new_tokens=240)
    graph = run(model, tok, "graph", prompts, p, steer)
    static = run(model, tok, "static", prompts, p, steer)
    eager = run(model, tok, "eager", prompts, p, steer)
    same(graph, static, tol)
    if dtype == torch.float32:
        same(graph, eager, 1e-4)
        for s in graph[:2]:
            assert s.finish_reason == "eos"
    else:
        assert [s.ids for s in graph[:2]] == [s.ids for s in eager[:2]]    # forced structure: same tokens
    sampler = Sampler(model, tok)
    sampler.stop_ids = set()
    q = SamplingParams(mode="serial", temperature=0, max_new_tokens=300)   # crosses a span: a second graph
    a = run(model, tok, "graph", [chat(tok, "x")] * 3, q, sampler=sampler)
    b = run(model, tok, "graph", [chat(tok, "x")] * 3, q, sampler=sampler)   # replays the kept graphs
    assert len(sampler.fast.graph) >= 2
    same(a, b, 0.0)                                   # replaying is deterministic
    same(a, run(model, tok, "static", [chat(tok, "x")] * 3, q), tol)


@pytest.mark.cuda
@cuda
def test_cuda_graph_compiled_equals_static(tmp_path):
    """torch.compile'd step (fused elementwise kernels, SDPA attention) captured as a graph: same
    tokens as the plain static step, log-probs within fp32 rounding of the fusions."""
    model, tok = make_checkpoint(tmp_path, tags_special=True)
    model = model.cuda()
    model.attn_impl = "sdpa"
    p = SamplingParams(mode="serial", temperature=1.0, max_new_tokens=40, seed=1)   # one graph key: one compile
    sampler = Sampler(model, tok)
    sampler.compile_step = True
    comp = run(model, tok, "graph", [chat(tok, "x"), chat(tok, "y")], p, sampler=sampler)
    assert sampler.fast.compiled and len(sampler.fast.graph) == 1
    same(comp, run(model, tok, "static", [chat(tok, "x"), chat(tok, "y")], p), 1e-4)


@pytest.mark.parametrize("mode", ["eager", "static", pytest.param("graph", marks=[pytest.mark.cuda, cuda])])
def test_rows_bounded_by_the_kv_budget(ck, mode):
    """A row holds its request's worst case (budget "critical": up to max_branches x max_new_tokens
    in all), so no row outgrows its room and nothing grows; the KV-cache budget (Sampler.cache_gb)
    bounds the rows: with room for two rows the three requests run two at a time, with the same samples."""
    from request import Seq, resolved
    model, tok = ck
    prompts, _ = workload(tok)
    trunks = {0: block_script(tok, ["1", "2"]), 1: block_script(tok, ["1", "2", "3", "4", "5"])}
    branches = {(r, 1, i): step_script(tok, i, "w" * (40 * i)) for r in (0, 1) for i in range(1, 6)}
    steer = Script(trunks, branches)
    p = SamplingParams(temperature=1.0, max_new_tokens=400, budget="critical")
    if mode == "graph":
        import copy
        model = copy.deepcopy(model).cuda()       # the fixture's model stays on the CPU
    cfg = model.config
    capacity = -(-max(Seq(x, resolved(p), 0).room() for x in prompts) // 256) * 256
    row_gb = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * capacity / 2 ** 30
    roomy, tight = Sampler(model, tok), Sampler(model, tok)
    tight.cache_gb = 2.5 * row_gb
    a = run(model, tok, mode, prompts, p, steer, sampler=roomy)
    b = run(model, tok, mode, prompts, p, steer, sampler=tight)
    same(a, b, 1e-4)     # log-probs: other batch shapes change the last bits (~1e-5 with 2 threads)
    assert (roomy.cache.doc.shape[0], tight.cache.doc.shape[0]) == (3, 2)
    assert tight.cache.capacity == capacity and max(len(s.ids) for s in b) > 400     # more than max_new_tokens in all
    assert b[1].stats["branches_per_fork"] == [5] and b[1].stats["critical_path_tokens"] <= 400
    tight.cache_gb = 0.5 * row_gb
    with pytest.raises(ValueError, match="more than the budget .* GB \\(Sampler.cache_gb\\)"):
        run(model, tok, mode, prompts, p, steer, sampler=tight)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_fused_projections_equal_separate(arch):
    """q|k|v and gate|up concatenated (the decode fast path's weights, its own per-layer step) give the
    same hidden states as the model, biases included (Qwen2); an in-place update shows in weights_version."""
    from decode_graph import fused_hidden_states, fused_projections, weights_version
    from model import Qwen, QwenConfig
    d = dict(architectures=[arch.capitalize() + "ForCausalLM"], model_type=arch, vocab_size=64, hidden_size=32,
             intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
             rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=True, max_position_embeddings=256)
    torch.manual_seed(0)
    model = Qwen(QwenConfig.from_dict(d))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_()
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == (arch == "qwen2")
    ids, pos = torch.randint(0, 64, (2, 9)), torch.arange(9).expand(2, 9)
    fused = fused_projections(model)
    with torch.no_grad():
        a, b = model.hidden_states(ids), fused_hidden_states(model, fused, ids, pos)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    v = weights_version(model)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(2)
    assert weights_version(model) != v
    with torch.no_grad():
        assert not torch.allclose(model.hidden_states(ids), b, atol=1e-3)    # the copies are now stale


def test_fused_static_step_equals_eager_and_follows_weight_updates(ck):
    """The fast path with fused projections: same samples as the eager step; after an in-place
    update of the weights (an RL step) the kept step rewrites its fused copies in place."""
    import copy
    model, tok = ck
    model = copy.deepcopy(model)
    prompts, steer = workload(tok)
    p = SamplingParams(temperature=1.0, max_new_tokens=240)
    sampler = Sampler(model, tok)
    sampler.fuse_step = True
    fused = run(model, tok, "static", prompts, p, steer, sampler=sampler)
    assert sampler.fast.fused is not None
    same(run(model, tok, "eager", prompts, p, steer), fused, 1e-4)
    fast, qkv = sampler.fast, sampler.fast.fused[0][0][0]
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
        model.model.layers[1].mlp.gate_proj.weight.mul_(0.5)
    again = run(model, tok, "static", prompts, p, steer, sampler=sampler)
    assert sampler.fast is fast and sampler.fast.fused[0][0][0] is qkv      # same tensors, rewritten
    same(run(model, tok, "eager", prompts, p, steer), again, 1e-4)
    assert any(a.logprobs != b.logprobs for a, b in zip(fused, again))


def test_the_kv_budget_on_a_gpu_counts_free_memory_and_the_kept_cache(monkeypatch):
    """free_gpu_bytes (half of it is the sampler's default budget on CUDA): the memory free on the
    device, what the caching allocator holds but does not use, and the kept cache (it is replaced)."""
    from decode_graph import free_gpu_bytes
    from sampler import KVCache
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (1000, 5000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 200)
    assert free_gpu_bytes("cuda:0") == 1100
    cfg = type("Cfg", (), dict(dtype=torch.float32, num_key_value_heads=2, head_dim=4, num_hidden_layers=3))
    cache = KVCache(cfg, rows=2, capacity=8)                 # 2 x 3 layers x (2 x 2 x 8 x 4) fp32 values
    assert free_gpu_bytes("cuda:0", cache) == 1100 + 2 * 3 * 2 * 2 * 8 * 4 * 4


@pytest.mark.parametrize("V", [151936, 300, 97])
def test_two_stage_argmax_is_the_first_maximal_index(V):
    """argmax_rows (the in-step greedy draw) equals argmax, the first maximal index on ties, for
    vocabularies that split into 128 chunks, fewer, or none (97 is prime); draw_tokens takes it as its
    greedy argmax."""
    from decode_graph import argmax_rows
    from sampler import draw_tokens
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(V)) * 4
    logits[1, [7, V // 2, V - 1]] = 100.0                      # ties: the first one wins
    logits[2, V - 1] = 100.0                                    # the max in the last chunk
    logits[3] = 0.0                                             # all equal
    want = logits.argmax(-1)
    assert argmax_rows(logits).tolist() == want.tolist() and want[1] == 7 and want[3] == 0
    assert draw_tokens(logits, 0.0, 1.0, 0, None, argmax=argmax_rows).tolist() == want.tolist()
