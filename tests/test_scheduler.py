"""Continuous batching: results independent of scheduling, bounded passes, isolation of
bad and failing requests, a soak test."""

import random
import threading

import pytest
import torch

from soundstorm.engine import DecodeConfig, Engine
from soundstorm.engine.decode import reference_decode
from soundstorm.engine.scheduler import Scheduler, batch_buckets, length_buckets

from conftest import make_model, random_codes, random_semantic

FAST = DecodeConfig(steps_per_level=(4, 2, 1, 1))


@pytest.fixture(scope="module")
def engine(tiny_config):
    return Engine(make_model(tiny_config, seed=5, sharpen=20.0), dtype=torch.float64)


def make_requests(cfg, n, seed=0, max_len=40):
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        S = rnd.randint(1, max_len)
        r = {"semantic": random_semantic(cfg, 1, S, seed=seed * 1000 + i)[0], "seed": rnd.randrange(2 ** 40)}
        if rnd.random() < 0.5:
            P = rnd.randint(0, 2 * S)
            r["prompt"] = random_codes(cfg, P, cfg.num_quantizers, seed=seed * 1000 + i)
        r["decode"] = rnd.choice([FAST, DecodeConfig(steps_per_level=(3, 1, 2, 1), temperature=0.7),
                                  DecodeConfig(steps_per_level=(1, 1, 1, 1))])
        out.append(r)
    return out


def alone(engine, r):
    """The request decoded alone by the plain reference decoder."""
    prompt = None if r.get("prompt") is None or r["prompt"].shape[0] == 0 else r["prompt"][None]
    batch = engine.prepare(r["semantic"][None], prompt=prompt, decode=r.get("decode"), seed=r["seed"])
    return reference_decode(engine, batch)[0]


def test_buckets():
    assert batch_buckets(8) == (1, 2, 4, 8) and batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(1) == (1,)
    assert tuple(length_buckets(1500)) == (64, 128, 256, 512, 768, 1024, 1280, 1500)
    assert tuple(length_buckets(256)) == (64, 128, 256) and tuple(length_buckets(50)) == (50,)
    assert tuple(length_buckets(300)) == (64, 128, 256, 300)
    every = length_buckets(1500)
    assert len(every) == 8 and 768 in every and 700 not in every and 0 not in every
    assert [every.fit(n) for n in (1, 64, 65, 256, 257, 1281, 1500)] == [64, 64, 128, 256, 512, 1500, 1500]
    assert all(every.fit(n) == min(t for t in every if t >= n) for n in range(1, 1501))
    assert every.up_to(600) == (64, 128, 256, 512, 768) and every.up_to(1) == (64,)


def test_length_buckets_are_computed_not_listed():
    """The bucket of a length is arithmetic: nothing is built per bucket, so the cost does
    not grow with max_frames."""
    huge = length_buckets(10 ** 9)
    assert huge.fit(300) == 512 and huge.fit(10 ** 9 - 1) == 10 ** 9
    assert len(huge) == 2 + (10 ** 9 - 1) // 256 + 1      # 64, 128; 256, 512, ...; 10**9
    assert 10 ** 9 in huge and 512 * 10 ** 5 in huge and 10 ** 9 - 1 not in huge
    assert huge.up_to(700) == (64, 128, 256, 512, 768)
    with pytest.raises(ValueError, match="frames must be in 1..max_frames=1000000000"):
        huge.fit(10 ** 9 + 1)


def test_generate_equals_the_reference_decoder_on_ragged_batches(engine, tiny_config):
    cfg = tiny_config
    semantic = random_semantic(cfg, 4, 60, seed=31)
    prompt = random_codes(cfg, 4, 20, cfg.num_quantizers, seed=32)
    for decode in (None, FAST, DecodeConfig(steps_per_level=(5, 2, 3, 1), temperature=0.8,
                                            gumbel_scale=2.0, greedy_last=False)):
        args = dict(semantic_lengths=[60, 9, 33, 1], prompt=prompt, prompt_lengths=[20, 0, 7, 2],
                    decode=decode, seed=[5, 6, 7, 8])
        want = reference_decode(engine, engine.prepare(semantic, **args))
        assert torch.equal(engine.generate(semantic, **args), want)


def test_generate_many_equals_each_request_decoded_alone(engine, tiny_config):
    requests = make_requests(tiny_config, 9, seed=1)
    outs = engine.generate_many(requests)
    for r, out in zip(requests, outs):
        T = tiny_config.frames_for(r["semantic"].shape[0])
        assert out.shape == (T, tiny_config.num_quantizers)
        assert torch.equal(out, alone(engine, r))


@pytest.mark.parametrize("pattern", range(4))
def test_random_arrival_patterns_do_not_change_results(engine, tiny_config, pattern):
    rnd = random.Random(pattern)
    requests = make_requests(tiny_config, 10, seed=10 + pattern, max_len=70)
    scheduler = Scheduler(engine, max_batch=rnd.randint(1, 5), threaded=False)
    handles, queue = [], list(requests)
    while queue or scheduler.in_flight:
        for _ in range(rnd.randint(0, 3)):
            if queue:
                handles.append(scheduler.submit(**queue.pop(0)))
        scheduler.step()
    for r, h in zip(requests, handles):
        assert torch.equal(h.result(), alone(engine, r))
    assert scheduler.stats.completed == 10 and scheduler.stats.failed == 0
    for (B, T) in scheduler.stats.buckets:
        assert B in scheduler.batch_buckets and T in scheduler.length_buckets


def test_each_request_takes_exactly_its_own_number_of_passes(engine, tiny_config):
    scheduler = Scheduler(engine, max_batch=4, threaded=False)
    passes = {}
    decodes = [FAST, DecodeConfig(steps_per_level=(1, 1, 1, 1)), DecodeConfig(steps_per_level=(9, 3, 2, 1))]
    handles = []
    for i, d in enumerate(decodes * 2):
        handles.append(scheduler.submit(random_semantic(tiny_config, 1, 5 + 7 * i)[0], decode=d,
                                        seed=i, on_step=lambda l, it, tok, i=i: passes.__setitem__(i, passes.get(i, 0) + 1)))
    finished_at = {}
    step = 0
    while scheduler.in_flight:
        scheduler.step()
        step += 1
        for i, h in enumerate(handles):
            if h.done() and i not in finished_at:
                finished_at[i] = step
    for i, d in enumerate(decodes * 2):
        n = sum(d.steps_per_level)
        assert passes[i] == n
    # the first four were admitted at step 1: they finish after exactly their own passes
    for i in range(4):
        assert finished_at[i] == sum((decodes * 2)[i].steps_per_level)


def test_on_step_sees_the_request_state(engine, tiny_config):
    seen = []
    out = engine.scheduler.submit(random_semantic(tiny_config, 1, 12)[0], decode=FAST, seed=1,
                                  on_step=lambda l, it, tok: seen.append((l, it, tok))).result(60)
    assert [(l, it) for l, it, _ in seen] == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert torch.equal(seen[-1][2], out)
    assert (seen[0][2][:, 1:] == tiny_config.mask_id).all()


def test_bad_requests_are_rejected_at_submit_without_disturbing_others(engine, tiny_config):
    scheduler = Scheduler(engine, max_batch=3, threaded=False)
    good = make_requests(tiny_config, 3, seed=3)
    handles = [scheduler.submit(**good[0])]
    scheduler.step()
    bad = [
        (dict(semantic=torch.full((5,), 99)), ValueError, r"semantic\[0, 0\] = 99 is out of range"),
        (dict(semantic=torch.zeros(2, 5, dtype=torch.long)), ValueError, "must be 1-D"),
        (dict(semantic=torch.zeros(5, dtype=torch.long), prompt=torch.zeros(3, 2, dtype=torch.long)),
         ValueError, "prompt has 2 RVQ levels"),
        (dict(semantic=torch.zeros(5, dtype=torch.long), seed="x"), TypeError, "seed must be an int"),
        (dict(semantic=torch.zeros(500, dtype=torch.long)), ValueError, "max_frames=256"),
        (dict(semantic=torch.zeros(5, dtype=torch.long), decode=DecodeConfig(steps_per_level=(1,))),
         ValueError, "steps_per_level has 1 entries"),
    ]
    for kwargs, exc, match in bad:
        with pytest.raises(exc, match=match):
            scheduler.submit(**kwargs)
    handles += [scheduler.submit(**r) for r in good[1:]]
    scheduler.run_until_idle()
    for r, h in zip(good, handles):
        assert torch.equal(h.result(), alone(engine, r))
    assert scheduler.stats.completed == 3


def test_a_failing_request_is_reported_to_its_caller_only(engine, tiny_config, monkeypatch):
    scheduler = Scheduler(engine, max_batch=4, threaded=False)
    requests = make_requests(tiny_config, 4, seed=4)
    poisoned_seed = requests[1]["seed"]
    real_step = scheduler.runner._step

    def step(buf, mode):   # a pass fails whenever the poisoned request is in it
        if (buf.seeds == poisoned_seed).any():
            raise RuntimeError("device error")
        real_step(buf, mode)

    monkeypatch.setattr(scheduler.runner, "_step", step)   # the engine's one runner

    def callback_fails(level, iteration, tokens):
        if level == 2:
            raise KeyError("callback bug")

    handles = [scheduler.submit(**r) for r in requests]
    handles.append(scheduler.submit(random_semantic(tiny_config, 1, 9)[0], decode=FAST, seed=3,
                                    on_step=callback_fails))
    with pytest.warns(RuntimeWarning, match="a batched decoding pass failed .*device error"):
        scheduler.run_until_idle()
    assert scheduler.stats.fallbacks > 0
    with pytest.raises(RuntimeError, match="device error"):
        handles[1].result()
    with pytest.raises(KeyError, match="callback bug"):
        handles[4].result()
    for i in (0, 2, 3):
        assert torch.equal(handles[i].result(), alone(engine, requests[i]))
    assert scheduler.stats.failed == 2 and scheduler.stats.completed == 3


def test_threaded_submit_from_many_threads(engine, tiny_config):
    requests = make_requests(tiny_config, 12, seed=6)
    handles = [None] * len(requests)
    done = []

    def worker(k):
        for i in range(k, len(requests), 3):
            handles[i] = engine.submit(**requests[i])
            handles[i].add_done_callback(lambda h: done.append(h.id))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, h in zip(requests, handles):
        assert torch.equal(h.result(timeout=120), alone(engine, r))
    assert sorted(done) == sorted(h.id for h in handles)


def test_generate_many_input_errors(engine):
    with pytest.raises(TypeError, match="requests must be a list"):
        engine.generate_many({"semantic": torch.zeros(3, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"requests\[1\] has keys \['semantics'\]"):
        engine.generate_many([{"semantic": torch.zeros(3, dtype=torch.long)},
                              {"semantics": torch.zeros(3, dtype=torch.long)}])
    with pytest.raises(ValueError, match="max_batch must be an int >= 1"):
        Engine.from_preset("tiny", max_batch=0)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_soak_hundreds_of_requests_with_random_arrivals(tiny_config):
    engine = Engine(make_model(tiny_config, seed=6), dtype=torch.float32)
    scheduler = Scheduler(engine, max_batch=8, threaded=False)
    rnd = random.Random(7)
    decode = DecodeConfig(steps_per_level=(2, 1, 1, 1))

    def wave(n):
        handles, lengths = [], []
        pending = n
        while pending or scheduler.in_flight:
            for _ in range(rnd.randint(0, 4)):
                if pending:
                    S = rnd.randint(1, 128)
                    lengths.append(tiny_config.frames_for(S))
                    handles.append(scheduler.submit(random_semantic(tiny_config, 1, S, seed=pending)[0],
                                                    decode=decode, seed=rnd.randrange(1000)))
                    pending -= 1
            scheduler.step()
        for h, T in zip(handles, lengths):
            out = h.result()
            assert out.shape == (T, tiny_config.num_quantizers)
            assert ((out >= 0) & (out < tiny_config.codebook_size)).all()

    wave(100)                      # warm-up: every bucket allocated
    before = _rss_bytes()
    wave(200)
    growth = _rss_bytes() - before
    assert growth < 32 * 2 ** 20, f"memory grew by {growth / 2**20:.1f} MiB"
    assert scheduler.stats.completed == 300 and scheduler.stats.failed == 0


# -- nothing stops the worker, nothing hangs ---------------------------------------------
TIMEOUT = 60


def _request(tiny_config, i):
    return dict(semantic=random_semantic(tiny_config, 1, 6 + i, seed=100 + i)[0], seed=i,
                decode=FAST)


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt])
def test_on_step_raising_a_base_exception_fails_only_its_request(engine, tiny_config, raised):
    scheduler = Scheduler(engine, max_batch=4, threaded=True)
    try:
        def callback(level, iteration, tokens):
            raise raised("from on_step")

        bad = scheduler.submit(**_request(tiny_config, 0), on_step=callback)
        good = scheduler.submit(**_request(tiny_config, 1))
        with pytest.raises(raised, match="from on_step"):
            bad.result(timeout=TIMEOUT)
        assert torch.equal(good.result(timeout=TIMEOUT), alone(engine, _request(tiny_config, 1)))
        later = scheduler.submit(**_request(tiny_config, 2))
        assert torch.equal(later.result(timeout=TIMEOUT), alone(engine, _request(tiny_config, 2)))
    finally:
        scheduler.close()


@pytest.mark.parametrize("how", ["handle", "future"])
def test_a_done_callback_raising_a_base_exception_does_not_stop_the_worker(engine, tiny_config, how):
    scheduler = Scheduler(engine, max_batch=4, threaded=True)
    try:
        gate = threading.Event()
        first = scheduler.submit(**_request(tiny_config, 3), on_step=lambda *a: gate.wait(TIMEOUT))
        seen = []

        def interrupt(_):
            raise KeyboardInterrupt("from a done-callback")

        if how == "handle":
            first.add_done_callback(interrupt)
            first.add_done_callback(lambda h: seen.append(h.id))
        else:
            first.future.add_done_callback(interrupt)
        gate.set()                        # the callbacks were added before the request ends
        assert torch.equal(first.result(timeout=TIMEOUT), alone(engine, _request(tiny_config, 3)))
        later = scheduler.submit(**_request(tiny_config, 4))
        assert torch.equal(later.result(timeout=TIMEOUT), alone(engine, _request(tiny_config, 4)))
        if how == "handle":
            assert seen == [first.id]     # a failing callback does not skip the next one
    finally:
        scheduler.close()


def test_a_pass_interrupted_by_a_base_exception_fails_its_requests(tiny_config, monkeypatch):
    engine = Engine(make_model(tiny_config, seed=5, sharpen=20.0), dtype=torch.float64)
    real_step = engine.runner._step
    interrupts = [SystemExit("device gone")]

    def step(buf, mode):
        if interrupts:
            raise interrupts.pop()
        real_step(buf, mode)

    monkeypatch.setattr(engine.runner, "_step", step)
    scheduler = Scheduler(engine, max_batch=4, threaded=True)
    try:
        handles = [scheduler.submit(**_request(tiny_config, i)) for i in range(2)]
        for h in handles:   # the pass both were in: failed (both, or only the first one
            try:            # if the second was queued after the pass began)
                h.result(timeout=TIMEOUT)
            except SystemExit as e:
                assert "device gone" in str(e)
        assert handles[0].future.exception(timeout=0) is not None
        later = scheduler.submit(**_request(tiny_config, 5))
        assert torch.equal(later.result(timeout=TIMEOUT), alone(engine, _request(tiny_config, 5)))
    finally:
        scheduler.close()

    # Driven by the caller: the interruption reaches it, and its requests are failed.
    interrupts.append(KeyboardInterrupt())
    scheduler = Scheduler(engine, max_batch=4, threaded=False)
    handle = scheduler.submit(**_request(tiny_config, 6))
    with pytest.raises(KeyboardInterrupt):
        scheduler.step()
    assert handle.done() and scheduler.in_flight == 0
    with pytest.raises(KeyboardInterrupt):
        handle.result(timeout=0)


def test_a_dead_worker_fails_what_was_in_flight_and_is_replaced(engine, tiny_config, monkeypatch):
    scheduler = Scheduler(engine, max_batch=4, threaded=True)
    real_wait = scheduler._wait_for_work
    calls = []

    def wait_then_die():
        calls.append(1)
        if len(calls) == 2:          # after one step: the thread dies outside any step
            raise SystemExit("killed")
        return real_wait()

    monkeypatch.setattr(scheduler, "_wait_for_work", wait_then_die)
    try:
        stranded = scheduler.submit(**_request(tiny_config, 7))
        with pytest.raises(RuntimeError, match="worker thread stopped unexpectedly .*killed"):
            stranded.result(timeout=TIMEOUT)
        monkeypatch.setattr(scheduler, "_wait_for_work", real_wait)
        later = scheduler.submit(**_request(tiny_config, 8))     # a new worker takes it
        assert torch.equal(later.result(timeout=TIMEOUT), alone(engine, _request(tiny_config, 8)))
    finally:
        scheduler.close()
