"""sampler.py, the engine: cached == the no-cache oracle (greedy and sampled), a sample does not depend
on its batch nor on when its branches are scheduled, continuous batching == one request at a time,
the head's log-probs == the trainer's, step()/cancel(), a request too big for the cache is passed for a while,
add() from another thread, params per prompt, a kept cache changes nothing.
The fork/join rules are tested in test_request.py.
Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_sampler.py (~30 s)."""
import pytest
import torch

from helpers import (Script, block_script, chat, full_layout, generate_naive, ids_of, make_checkpoint, step_script,
                     teacher_forced)
from sampler import Sampler, SamplingParams, draw_tokens


def test_serial_cached_equals_naive(ck):
    model, tok = ck
    prompt = chat(tok)
    s = Sampler(model, tok).generate([prompt], params=SamplingParams(mode="serial", temperature=0, max_new_tokens=40))[0][0]
    ids, lps = generate_naive(model, prompt, 40, tok.stop_ids)
    assert s.ids == ids
    assert max(abs(a - b) for a, b in zip(s.logprobs, lps)) <= 1e-4
    assert set(s.branch) == {0} and s.pos == list(range(len(prompt), len(prompt) + len(ids)))


def test_serial_sampling_equals_naive_with_the_same_seed(ck):
    model, tok = ck
    prompt = chat(tok)
    p = SamplingParams(mode="serial", temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=30, seed=3)
    s = Sampler(model, tok).generate([prompt], params=p)[0][0]
    ids, _ = generate_naive(model, prompt, 30, tok.stop_ids, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    assert s.ids == ids


def test_seeded_runs_repeat_and_batch_rows_differ(ck):
    model, tok = ck
    p = SamplingParams(temperature=100.0, max_new_tokens=25, seed=7)  # flat: the random model is very peaked
    a = Sampler(model, tok).generate([chat(tok)], n=3, params=p)[0]
    b = Sampler(model, tok).generate([chat(tok)], n=3, params=p)[0]
    assert [s.ids for s in a] == [s.ids for s in b]
    assert len({tuple(s.ids) for s in a}) > 1


def test_draw_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    us = [torch.rand(1) for _ in range(200)]
    assert draw_tokens(logits, 0, 1.0, 0, us[0]).item() == 1
    assert all(draw_tokens(logits, 1.0, 1.0, 1, u).item() == 1 for u in us)             # top-k 1
    assert all(draw_tokens(logits, 1.0, 1e-3, 0, u).item() == 1 for u in us)            # tiny top-p
    assert {draw_tokens(logits, 1.0, 1.0, 2, u).item() for u in us} == {1, 3}           # top-k 2
    # inverse CDF: frequencies follow the softmax
    p = torch.softmax(logits, -1)[0]
    draws = draw_tokens(logits.expand(20000, 4), 1.0, 1.0, 0, torch.rand(20000))
    freq = torch.bincount(draws, minlength=4) / 20000
    assert (freq - p).abs().max() < 0.015
    assert draw_tokens(logits, 1.0, 1.0, 0, torch.tensor([0.999999])).item() == 3  # the last token with mass


@pytest.mark.parametrize("temperature", [1e-45, 1e-39, 1e-30, 1e-7])
def test_a_tiny_temperature_is_greedy(ck, temperature):
    """logits / T overflows fp32 at T <= ~1e-38 (softmax NaN, the draw clamped to the last id): below
    GREEDY_BELOW a temperature is argmax, in draw_tokens, in the decode step's draw and so in every caller."""
    from decode_graph import in_step_settings
    from request import GREEDY_BELOW, resolved
    assert temperature < GREEDY_BELOW
    logits = torch.tensor([[-50.0, 30.0, 29.9, 10.0, -3.0]])
    assert all(draw_tokens(logits, temperature, 1.0, 0, u).item() == 1 for u in torch.rand(20, 1))
    assert in_step_settings([resolved(SamplingParams(temperature=temperature))], None) == (0.0, 1.0, 0)
    model, tok = ck
    p = dict(mode="serial", max_new_tokens=20, seed=5)
    greedy = Sampler(model, tok).generate([chat(tok)], n=2, params=SamplingParams(temperature=0, **p))[0]
    tiny = Sampler(model, tok).generate([chat(tok)], n=2, params=SamplingParams(temperature=temperature, **p))[0]
    assert [s.ids for s in tiny] == [s.ids for s in greedy]


@pytest.mark.parametrize("V", [151936, 300, 97])
def test_two_stage_logprob(V):
    """logprob_of (the draw's log-prob, and the decode step's head) equals log_softmax, for vocabularies
    that split into 128 chunks, fewer, or none (97 is prime)."""
    from sampler import logprob_of
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(5, V, generator=g) * 4
    logits[1, [7, V // 2, V - 1]] = 100.0
    logits[3] = 0.0
    tok = torch.randint(0, V, (5,), generator=g)
    ref = logits.log_softmax(-1).gather(1, tok[:, None])[:, 0]
    torch.testing.assert_close(logprob_of(logits, tok), ref, atol=1e-5, rtol=2e-6)


def test_head_logprobs_match_the_trainer_on_a_real_vocabulary():
    """From the same hidden states, over Qwen's 151936-row vocabulary with logits peaked like a
    trained model's (largest 14-40), the sampler's recorded log-probs (Sampler.draw; the decode
    step's logprob_of) are within 2 fp32 ULPs of the largest logit of the trainer's chunked
    logsumexp (~1e-5; torch's CPU log_softmax is 3x past it). What goes beyond that between a
    sampler and a training forward comes from the hidden states (decode vs prefill attention,
    matmul shapes), not from the head."""
    import torch.nn.functional as F
    from model import chunked_logprobs
    from request import Seq, resolved
    from sampler import logprob_of
    g = torch.Generator().manual_seed(0)
    V, d, N = 151936, 16, 64
    h = F.normalize(torch.randn(N, d, generator=g), dim=-1) * d ** 0.5        # an RMS-normed hidden state
    h = h * torch.tensor([3.5, 4.5, 6.0, 8.0]).repeat(N // 4)[:, None]
    W = torch.randn(V, d, generator=g) / d ** 0.5
    logits = F.linear(h, W)
    assert 12 < logits.max(-1).values.min() and logits.max() < 60
    bound = 4 * logits.abs().max() * 2 ** -24             # 2 ULPs of the largest logit
    sampler = Sampler.__new__(Sampler)                   # only its head runs: no model, no tokenizer
    got = {}
    sampler.steer = None
    seqs = [Seq([0], resolved(SamplingParams()), i, i) for i in range(N)]
    got["toks"], got["lps"] = sampler.draw([(q, q.trunk) for q in seqs], logits)
    tok = torch.tensor(got["toks"])
    ref = chunked_logprobs(h[None], W, tok[None])[0]
    assert (torch.tensor(got["lps"]) - ref).abs().max() <= bound
    assert (logprob_of(logits, tok) - ref).abs().max() <= bound


def test_a_row_samples_the_same_in_any_batch(ck):
    model, tok = ck
    p = SamplingParams(mode="serial", temperature=100.0, max_new_tokens=20)   # flat, so rows really sample
    sampler = Sampler(model, tok)
    sampler.stop_ids = set()
    alone = sampler.generate([chat(tok, "b")], params=p, seeds=[42])[0][0]
    batched = sampler.generate([chat(tok, "a"), chat(tok, "b"), chat(tok, "a much longer prompt here")],
                               params=p, seeds=[1, 42, 2])[1][0]
    assert alone.ids == batched.ids and len(set(alone.ids)) > 3


def test_branches_sample_the_same_whatever_their_schedule(ck, monkeypatch):
    """Each branch draws from its own generator, so its tokens do not depend on the steps at which it
    and its siblings draw. Once alone on the engine's own schedule; once batched with another row and
    with branch 2 held back for its first 5 steps (another schedule: branch 1 draws alone meanwhile,
    then the two draw side by side at other steps than alone). Each branch's tokens are the same, up to
    where the budget cuts the fork (the hold moves the cut). Branches sharing the row's generator fail it."""
    from request import Seq
    model, tok = ck
    p = SamplingParams(temperature=100.0, max_new_tokens=60, fork_min_tokens=1)   # flat: the branches really sample
    trunk = tok.encode("<guideline>\n<plan>1: a</plan>\n<plan>2: b</plan>\n</guideline>")
    sampler = Sampler(model, tok)
    sampler.stop_ids = set()
    alone = sampler.generate([chat(tok)], params=p, seeds=[5], steer=Script({0: trunk}))[0][0]
    held, to_feed = [], Seq.to_feed

    def hold_branch_2(seq):                            # the engine asks each step what a request writes
        feed = to_feed(seq)
        if seq.index == 1 and any(st.branch == 2 for _, st in feed) and len(held) < 5:
            held.append(feed[-1][0].pos)
            feed = [(t, st) for t, st in feed if st.branch != 2]
        return feed
    monkeypatch.setattr(Seq, "to_feed", hold_branch_2)
    batched = sampler.generate([chat(tok, "x"), chat(tok)], params=p, seeds=[6, 5],
                               steer=Script({0: trunk, 1: trunk}))[1][0]
    assert len(set(held)) == 1 and len(held) == 5      # its first token waited 5 steps
    for s in (alone, batched):
        assert s.stats["forks"] == 1 and s.stats["branches_per_fork"] == [2]
    for b in (1, 2):
        x = [t for t, br in zip(alone.ids, alone.branch) if br == b]
        y = [t for t, br in zip(batched.ids, batched.branch) if br == b]
        n = min(len(x), len(y))
        assert n >= 8 and x[:n] == y[:n], (b, x, y)
    assert alone.branch.count(1) < batched.branch.count(1)    # branch 1 drew more before the cut: it ran ahead


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_triton_sampler_matches_teacher_forced(tmp_path):
    """On CUDA the sampler and the trainer both go through the Triton kernels (decode and prefill)."""
    model, tok = make_checkpoint(tmp_path, tags_special=True)
    model = model.cuda()
    steer = Script({0: block_script(tok, ["1", "2", "3"])},
                   {(0, 1, i): step_script(tok, i, "x" * (3 * i) + " = 1") for i in (1, 2, 3)})
    s = Sampler(model, tok).generate([chat(tok)], params=SamplingParams(), steer=steer)[0][0]
    assert s.finish_reason == "eos"
    ids, pos, layout = full_layout(s)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    with torch.no_grad():
        lp = model(ids.cuda(), pos.cuda(), layout.to("cuda"), targets=targets.cuda())[0].cpu()
    P = len(s.prompt_ids)
    got = lp[P - 1:P - 1 + len(s.ids)]
    sampled = torch.tensor(s.sampled)
    assert (got - torch.tensor(s.logprobs))[sampled].abs().max() <= 1e-3


def test_autocast_bf16_paths_run(ck):
    """Under autocast (bf16 matmuls, fp32 weights: the GPU training setup) the sampler's cache takes
    the autocast dtype and the attention dispatcher casts q, k, v alike; results stay close to fp32."""
    model, tok = ck
    p = SamplingParams(temperature=0, max_new_tokens=12)
    steer = Script({0: block_script(tok, ["1", "2"])}, {(0, 1, i): step_script(tok, i, "ab") for i in (1, 2)})
    ref = Sampler(model, tok).generate([chat(tok)], params=p, steer=steer)[0][0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = Sampler(model, tok).generate([chat(tok)], params=p, steer=steer)[0][0]
        lp = teacher_forced(model, s)
    assert s.ids == ref.ids
    r = torch.tensor(ref.logprobs)
    assert ((torch.tensor(s.logprobs) - r).abs() <= 0.01 * r.abs() + 0.05).all()    # bf16 rounding
    r = teacher_forced(model, ref)
    assert ((lp - r).abs() <= 0.01 * r.abs() + 0.05).all()


def flat(model):
    """A copy of the model whose next-token distributions are flat (the fixture's are peaked), so rows really sample."""
    import copy
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(0.02)
    return model


def same_samples(a, b, tol=1e-4):   # tokens exactly; log-probs: other batch shapes change the last bits
    assert [(s.ids, s.block, s.branch, s.pos, s.sampled, s.finish_reason) for s in a] == \
           [(s.ids, s.block, s.branch, s.pos, s.sampled, s.finish_reason) for s in b]
    assert max(abs(x - y) for s, t in zip(a, b) for x, y in zip(s.logprobs, t.logprobs)) <= tol


@pytest.mark.parametrize("step", ["eager", "static"])
@pytest.mark.parametrize("mode", ["serial", "parallel"])
def test_continuous_batching_equals_one_at_a_time(ck, mode, step):
    """Seven requests of ragged lengths on three rows: a finished row takes the next waiting request at
    the next step (so the call takes about as many steps as its longest row, not the sum of its
    batches' longest), and every sample is the one it gets decoded alone, whenever it was admitted.
    Serial + static: the step draws the tokens itself; parallel: forced forks of several widths."""
    model, tok = ck
    model = flat(model)
    lens = [40, 6, 7, 5, 6, 7, 5] if mode == "serial" else [90, 12, 140, 10, 11, 100, 9]
    ps = [SamplingParams(mode=mode, temperature=1.0, max_new_tokens=n, fork_min_tokens=1) for n in lens]
    prompts = [chat(tok, "q" * (1 + i % 3)) for i in range(7)]
    steer = None
    if mode == "parallel":
        steer = Script({0: block_script(tok, ["1", "2"]), 2: block_script(tok, ["1", "2", "3"]),
                        5: ids_of(tok, "Hm. ") + block_script(tok, ["1", "2"])},
                       {(r, 1, i): step_script(tok, i, "w" * (3 * i + r)) for r in (0, 2, 5) for i in (1, 2, 3)})
    sampler = Sampler(model, tok)
    sampler.stop_ids, sampler.step_mode = set(), step
    sampler.admit_every = 2 if step == "static" else 1       # admissions batched: a later start, the same samples
    got, _ = sampler.generate_many(prompts, 1, ps, batch_rows=3, seeds=list(range(10, 17)), steer=steer)
    assert sampler.cache.doc.shape[0] == 3
    steps = sampler.counters["steps"]
    alone, alone_steps = [], []
    for i, (x, p) in enumerate(zip(prompts, ps)):
        one = Sampler(model, tok)
        one.stop_ids, one.step_mode = set(), step
        sc = None if steer is None else Script({0: steer.trunk[i]} if i in steer.trunk else {},
                                               {(0, b, k): v for (r, b, k), v in steer.branches.items() if r == i})
        alone.append(one.generate([x], params=p, seeds=[10 + i], steer=sc)[0][0])
        alone_steps.append(one.counters["steps"])
    same_samples([g[0] for g in got], alone)
    static = sum(max(alone_steps[i:i + 3]) for i in range(0, 7, 3))    # batches of 3 that wait for their longest
    assert steps <= 0.8 * static, (steps, alone_steps)
    if mode == "parallel":
        assert [alone[i].stats["branches_per_fork"] for i in (0, 2, 5)] == [[2], [3], [2]]
    else:
        assert len({t for s in alone for t in s.ids}) > 20         # the rows really sampled


def test_engine_steps_stream_samples_and_cancel_frees_the_row(ck):
    """The engine driven by step(): requests join while others run; a cancelled request ends at the
    next step and its row goes to the next waiting request; on_sample sees each sample as it ends."""
    from request import resolved
    model, tok = ck
    sampler = Sampler(model, tok)
    sampler.stop_ids, sampler.max_rows = set(), 2
    p = SamplingParams(mode="serial", temperature=0, max_new_tokens=50)
    a, b = sampler.add(chat(tok, "a"), p, 1), sampler.add(chat(tok, "b"), p, 2)
    for _ in range(3):
        assert sampler.step() == []
    c = sampler.add(chat(tok, "c"), p, 3)                  # no row free: it waits
    assert sampler.step() == [] and c.row is None and len(a.trunk.tokens) == 5
    sampler.cancel(b)
    row = b.row
    assert sampler.step() == [b] and b.finish == "cancelled" and len(b.trunk.tokens) == 5
    assert sampler.step() == [] and c.row == row and len(c.trunk.tokens) == 2   # admitted: prefill + one step
    done = []
    while sampler.running:
        done += sampler.step()
    assert done == [a, c] and c.to_sample().ids == Sampler(model, tok).generate(
        [chat(tok, "c")], params=p, seeds=[3])[0][0].ids[:len(c.trunk.tokens)]
    order = []
    out = sampler.generate([chat(tok, "x"), chat(tok, "y")], params=[resolved(p), SamplingParams(
        mode="serial", temperature=0, max_new_tokens=5)], on_sample=lambda i, j, s: order.append((i, j, s)))
    assert [(i, j) for i, j, _ in order] == [(1, 0), (0, 0)] and order[0][2] is out[1][0]



def test_a_request_too_big_for_the_cache_lets_smaller_ones_pass_for_a_while(ck):
    """A request that needs more room than the running cache has waits for the rows to drain (a running
    request keeps its row); meanwhile smaller ones behind it go into the free rows, for overtake_steps
    steps; then nothing new is admitted, the rows drain, the cache is sized for it and it runs first.
    Every sample is the one it gets alone."""
    model, tok = ck
    sampler = Sampler(model, tok)
    sampler.stop_ids, sampler.max_rows, sampler.overtake_steps = set(), 3, 4
    small = lambda n: SamplingParams(mode="serial", temperature=0, max_new_tokens=n)
    a = sampler.add(chat(tok, "a"), small(30), 1)
    done = sampler.step()
    assert sampler.cache.capacity == 256 and a.row is not None
    big = sampler.add(chat(tok, "big"), small(200), 2)
    c, d = sampler.add(chat(tok, "c"), small(6), 3), sampler.add(chat(tok, "d"), small(6), 4)
    done += sampler.step()
    assert big.room() > 256 and big.row is None and c.row is not None and d.row is not None   # they pass it
    while not (c.finish and d.finish):
        done += sampler.step()
    e = sampler.add(chat(tok, "e"), small(6), 5)
    for _ in range(3):
        done += sampler.step()
    assert e.row is None and big.row is None and len(sampler.free) == 2 and not a.finish   # 4 steps on: a drains
    while big.row is None:
        done += sampler.step()
    assert a.finish and sampler.cache.capacity == 512 and sampler.running == [big, e]
    while sampler.running:
        done += sampler.step()
    assert done == [c, d, a, e, big]
    for seq, n in zip((a, big, c, d, e), (30, 200, 6, 6, 6)):
        alone = Sampler(model, tok).generate([seq.prompt], params=small(n), seeds=[seq.seed])[0][0]
        assert seq.to_sample().ids == alone.ids


def test_add_from_another_thread_while_the_engine_looks_at_its_queue(ck, monkeypatch):
    """serve.py's HTTP threads add() while its worker steps: the queue's lock keeps schedule's look at the
    waiting requests whole (an add in the middle of it raised "deque mutated during iteration")."""
    import threading
    from request import Seq
    model, tok = ck
    sampler, p = Sampler(model, tok), SamplingParams(mode="serial", temperature=0, max_new_tokens=5)
    sampler.add(chat(tok, "a"), p, 1)
    added, room = [], Seq.room

    def room_while_another_thread_adds(seq):         # the first look at the queue: another thread adds
        if not added:
            added.append(threading.Thread(target=lambda: added.append(sampler.add(chat(tok, "b"), p, 2))))
            added[0].start()
            added[0].join(0.2)                          # it waits for the lock (without one: it adds now)
        return room(seq)
    monkeypatch.setattr(Seq, "room", room_while_another_thread_adds)
    done = sampler.step()
    added[0].join(10)
    monkeypatch.undo()
    while sampler.waiting or sampler.running:
        done += sampler.step()
    assert len(added) == 2 and sorted(seq.seed for seq in done) == [1, 2] and all(s.finish for s in done)

def test_params_per_prompt_batch_like_alone(ck):
    """One generate() over prompts with different settings (mode, temperature, top-p/k, budget)
    gives each row what it gets alone with its own settings and seed."""
    model, tok = ck
    sampler = Sampler(model, tok)
    ps = [SamplingParams(mode="serial", temperature=0, max_new_tokens=12),
          SamplingParams(mode="parallel", temperature=1.0, top_p=0.8, max_new_tokens=30),
          SamplingParams(mode="serial", temperature=50.0, top_k=20, max_new_tokens=20)]
    prompts = [chat(tok, "a"), chat(tok, "bb"), chat(tok, "ccc")]
    together = [o[0] for o in sampler.generate(prompts, params=ps, seeds=[5, 6, 7])]
    alone = [sampler.generate([x], params=p, seeds=[sd])[0][0] for x, p, sd in zip(prompts, ps, [5, 6, 7])]
    assert [s.ids for s in together] == [s.ids for s in alone]
    assert len(together[0].ids) <= 12 and len(set(together[2].ids)) > 3
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        sampler.generate(prompts, params=ps[:2])


def test_eager_cache_kept_between_calls_changes_nothing(ck):
    """The eager step's KV cache is kept for the next call with the same rows and capacity; its
    stale k/v (masked by the reset metadata) must not change what the next call decodes."""
    model, tok = ck
    p = SamplingParams(temperature=1.0, max_new_tokens=120, seed=11)
    steer = Script({0: block_script(tok, ["1", "2"])})
    s = Sampler(model, tok)
    s.generate([chat(tok, "something else entirely")], params=p)
    kept = s.cache
    again = s.generate([chat(tok)], params=p, steer=steer)[0][0]
    assert s.cache is kept and kept is not None
    fresh = Sampler(model, tok).generate([chat(tok)], params=p, steer=steer)[0][0]
    assert again.ids == fresh.ids and again.logprobs == fresh.logprobs and fresh.stats["forks"] == 1
    s.release()
    assert s.cache is None and s.fast is None


@pytest.mark.slow
def test_sampler_logprobs_equal_a_training_forward_on_a_trained_real_vocabulary_model(tmp_path):
    """A small Qwen3 with Qwen's 151,936-row vocabulary and real tokenizer (tags added as at SFT),
    trained on the CPU for 400 steps on the built-in task's tagged solutions until it writes the
    format, then sampled at T=1 in both modes over all 151,936 rows: the log-prob the sampler records
    for each drawn token and the one a training forward of the same sequence computes
    (helpers.teacher_forced: one forward with the sampler's layout and positions) differ by at most
    5e-5. Training is cheap (~30 s): the other 151,893 rows are zero and their total mass is one
    column of the training softmax, which is then exactly the full softmax the sampler draws from (a
    full-vocabulary training step costs ~2 s on 2 cores). Measured (fp32, CPU; training differs by
    thread count, so the samples do): 2 threads, 2,738 sampled tokens: max 7.6e-6, median 0 (most
    tokens agree to the bit), mean 7.3e-7; 1 thread, 3,022 tokens: max 5.7e-6, median 0, mean 7.4e-7.
    The gap is fp32 rounding in the hidden states (decode vs prefill matmul shapes), ~1 ULP of a
    logit of ~20."""
    import random
    import npr
    import toy
    from helpers import qwen3_tokenizer_dir
    from model import Qwen, QwenConfig, add_tag_tokens
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(qwen3_tokenizer_dir(tmp_path / "qwen3"))
    cfg = dict(toy.model_config(toy.Config(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                                           intermediate_size=192), 151936, tok.eos_id), max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Qwen(QwenConfig.from_dict(cfg))
    toy.init_weights(model)
    add_tag_tokens(model, tok, npr.TAG_NAMES)
    assert model.config.vocab_size == 151936 and tok.token_to_id("<step>") > 151643
    rng = random.Random(0)

    def prompt(q):
        return tok.encode(tok.render_chat([{"role": "user", "content": npr.build_prompt(q, "In parallel.")}],
                                          enable_thinking=False))

    def example():
        p = toy.make_problem(rng, nterms=(2, 3), adigits=(1, 2))
        x = prompt(p["question"])
        return x + tok.encode(toy.tagged_solution(p["terms"])) + [tok.eos_id], len(x)

    used = sorted({t for _ in range(200) for t in example()[0]})   # every id the task's texts use
    to_sub = torch.full((151936,), -1, dtype=torch.long)
    to_sub[used] = torch.arange(len(used))
    rest = torch.ones(151936, dtype=torch.bool)
    rest[used] = False
    with torch.no_grad():               # the other rows: zero logits, as in a full softmax that ...
        model.output_weight[rest] = 0.0
    log_rest = torch.tensor(float(rest.sum())).log()     # ... training counts in one column: their total mass
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    model.train()
    for _ in range(400):
        ids, tgt = toy.collate([example() for _ in range(8)], tok.pad_id)
        logits = model.hidden_states(ids) @ model.output_weight[used].T        # (B, T, |used|)
        logits = torch.cat([logits, log_rest.expand(*logits.shape[:2], 1)], -1)
        sub = to_sub[tgt.clamp(min=0)].masked_fill(tgt < 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), sub.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 1.0, loss.item()
    prompts = [prompt(toy.make_problem(rng, nterms=(2, 3), adigits=(1, 2))["question"]) for _ in range(8)]
    diffs, forks, right = [], 0, 0
    for mode in ("serial", "parallel"):
        out = Sampler(model, tok).generate(prompts, n=2, params=SamplingParams(mode=mode, max_new_tokens=200, seed=1))
        for s in (s for ss in out for s in ss):
            forks += s.stats["forks"]
            right += npr.format_score(s.text)[0] == 0.0
            sampled = torch.tensor(s.sampled)
            diffs.append((teacher_forced(model, s) - torch.tensor(s.logprobs))[sampled].abs())
    d = torch.cat(diffs)
    print(f"sampler vs training forward over {d.numel()} sampled tokens: max {d.max():.2e}, median "
          f"{d.median():.2e}, mean {d.mean():.2e} | forks {forks} | well formed {right}/32 | loss {loss.item():.3f}")
    assert forks >= 8 and d.numel() > 1000         # the model writes the format: the parallel samples forked
    assert d.max() <= 5e-5
