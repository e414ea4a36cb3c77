"""Long-form generation (slide-and-prompt windows) and streaming."""

import pytest
import torch

from soundstorm.engine import DecodeConfig, Engine, ModelConfig
from soundstorm.engine.longform import plan_windows, window_seed

from conftest import make_model, random_codes, random_semantic


@pytest.mark.parametrize("rates", [(25, 50), (12.5, 75), (50, 50)])
@pytest.mark.parametrize("S", [1, 7, 60, 333])
@pytest.mark.parametrize("window,overlap", [(100, 20), (64, 0), (31, 30), (256, 150)])
def test_windows_tile_the_clip_on_semantic_aligned_starts(rates, S, window, overlap):
    cfg = ModelConfig.preset("tiny", semantic_rate=rates[0], frame_rate=rates[1])
    total = cfg.frames_for(S)
    if total < 1:
        return
    num, den = cfg.semantic_index_fraction()
    try:
        windows = plan_windows(cfg, S, 0, window, overlap)
    except ValueError as e:
        assert "semantic-aligned" in str(e)
        return
    covered = 0
    for i, w in enumerate(windows):
        assert w.frames <= window and w.start * num == w.semantic_start * den
        assert cfg.frames_for(w.semantic_len) >= w.frames
        assert w.semantic_start + w.semantic_len <= S
        if i:
            assert w.prompt >= overlap and w.start + w.prompt == covered  # overlap = prompt
        assert w.start + w.frames > covered or total == 0                 # every window adds frames
        covered = w.start + w.frames
    assert covered == total and windows[0].start == 0


@pytest.fixture(scope="module")
def engine(tiny_config):
    return Engine(make_model(tiny_config, seed=4, sharpen=20.0), dtype=torch.float64)


def test_long_clip_has_the_exact_length_and_keeps_every_seam(engine, tiny_config):
    cfg = tiny_config
    semantic = random_semantic(cfg, 1, 301, seed=1)[0]           # 602 frames > max_frames 256
    prompt = random_codes(cfg, 30, cfg.num_quantizers, seed=2)
    calls = []
    generate = engine.generate

    def spy(sem, prompt=None, **kw):
        out = generate(sem, prompt=prompt, **kw)
        calls.append((prompt, out))
        return out

    engine.generate = spy
    try:
        chunks = list(engine.stream(semantic, prompt=prompt, seed=9,
                                     decode=DecodeConfig(steps_per_level=(3, 1, 1, 1))))
    finally:
        del engine.generate
    out = torch.cat([c.tokens for c in chunks])
    assert out.shape == (602, cfg.num_quantizers) and (out >= 0).all() and (out < cfg.codebook_size).all()
    assert torch.equal(out[:30], prompt)
    windows = plan_windows(cfg, 301, 30)
    assert len(calls) == len(windows) > 2
    for w, (given, result) in zip(windows, calls):
        assert torch.equal(result[0, :w.prompt], given[0]), "a window changed its prompt"
        assert torch.equal(out[w.start:w.start + w.prompt], given[0]), "seam tokens differ"
        assert torch.equal(out[w.start:w.start + w.frames], result[0, :w.frames])
    starts = [c.start for c in chunks]
    assert starts[0] == 0 and all(a.start + len(a.tokens) == b.start for a, b in zip(chunks, chunks[1:]))


def test_streaming_yields_the_tokens_of_the_non_streaming_call(engine, tiny_config):
    semantic = random_semantic(tiny_config, 1, 170, seed=3)
    decode = DecodeConfig(steps_per_level=(3, 2, 1, 1))
    whole = engine.generate_long(semantic, seed=5, decode=decode, window=120, overlap=40)
    streamed = torch.cat([c.tokens for c in engine.stream(semantic, seed=5, decode=decode,
                                                          window=120, overlap=40)])
    assert torch.equal(whole, streamed) and whole.shape[0] == 340
    assert not torch.equal(whole, engine.generate_long(semantic, seed=6, decode=decode,
                                                       window=120, overlap=40))


def test_a_clip_that_fits_one_window_decodes_as_generate(engine, tiny_config):
    semantic = random_semantic(tiny_config, 1, 40, seed=4)
    prompt = random_codes(tiny_config, 1, 12, tiny_config.num_quantizers, seed=5)
    assert torch.equal(engine.generate_long(semantic, prompt=prompt, seed=77),
                       engine.generate(semantic, prompt=prompt, seed=77)[0])


def test_stream_decodes_audio_with_a_codec(engine, tiny_config):
    class Codec:
        def decode(self, tokens):
            return tokens.float().sum(-1).repeat_interleave(4, dim=1)   # [1, n * 4]

    chunks = list(engine.stream(random_semantic(tiny_config, 1, 150)[0], seed=0, codec=Codec(),
                                 decode=DecodeConfig(steps_per_level=(1, 1, 1, 1))))
    assert len(chunks) > 1
    for c in chunks:
        assert c.audio.shape == (1, 4 * len(c.tokens))


def test_window_seeds_differ_and_are_valid():
    seeds = [window_seed(123, i) for i in range(50)]
    assert seeds[0] == 123 and len(set(seeds)) == 50
    assert all(0 <= s < 2 ** 63 for s in seeds)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(window=300), ValueError, r"window must be in 1..max_frames=256"),
    (dict(window=100, overlap=100), ValueError, r"overlap must be in 0..window-1=99"),
    (dict(window=1, overlap=0), ValueError, "semantic-aligned"),
    (dict(window=10.5), TypeError, "window must be an int"),
    (dict(seed=-3), ValueError, "seed must be an int in 0..2"),
    (dict(semantic=torch.zeros(2, 300, dtype=torch.long)), ValueError, "batch size 1"),
    (dict(semantic=torch.full((300,), 99)), ValueError, r"semantic\[0, 0\] = 99 is out of range"),
    (dict(prompt=torch.zeros(300, 4, dtype=torch.long)), ValueError, "more than the first window"),
    (dict(codec=object()), TypeError, "codec must have a decode"),
])
def test_bad_long_form_input(engine, kwargs, exc, match):
    args = dict(semantic=torch.zeros(300, dtype=torch.long))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        list(engine.stream(**args))


def test_stream_checks_every_argument_at_the_call(engine, tiny_config, monkeypatch):
    cfg = tiny_config
    good = random_semantic(cfg, 1, 301, seed=3)[0]
    calls = []
    monkeypatch.setattr(engine, "generate", lambda *a, **k: calls.append(a) or 1 / 0)
    cases = [
        (dict(semantic=torch.full((300,), 99)), ValueError, r"semantic\[0, 0\] = 99 is out of range"),
        (dict(semantic=good.float()), TypeError, "semantic must hold integer ids"),
        (dict(semantic=""), TypeError, "semantic must be a torch.Tensor, got str ''"),
        (dict(semantic=good, prompt=torch.full((10, cfg.num_quantizers), 77)), ValueError,
         r"prompt\[0, 0, 0\] = 77 is out of range"),
        (dict(semantic=good, prompt=torch.zeros(10, 3, dtype=torch.long)), ValueError,
         "prompt has 3 RVQ levels"),
        (dict(semantic=good, prompt=torch.zeros(10, cfg.num_quantizers, device="meta", dtype=torch.long)),
         ValueError, "prompt is on the meta device"),
        (dict(semantic=good, decode=DecodeConfig(steps_per_level=(2,))), ValueError,
         "steps_per_level has 1 entries"),
        (dict(semantic=good, decode="fast"), TypeError, "decode must be a DecodeConfig"),
        (dict(semantic=good, window=10 ** 6), ValueError, "window must be in 1..max_frames"),
        (dict(semantic=good, seed=-1), ValueError, "seed must be an int in 0..2\\*\\*63-1"),
        (dict(semantic=good, codec=object()), TypeError, "codec must have a decode"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            engine.stream(**kwargs)            # the call itself raises: no next() needed
        with pytest.raises(exc, match=match):
            engine.generate_long(**kwargs) if "codec" not in kwargs else engine.stream(**kwargs)
    chunks = engine.stream(good, seed=1)       # good input: still lazy, nothing decoded yet
    assert calls == []
    with pytest.raises(ZeroDivisionError):
        next(chunks)
    assert len(calls) == 1
