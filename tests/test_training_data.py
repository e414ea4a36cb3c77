"""Token corpus format (writer, memory-mapped reader, error reporting) and training windows
(alignment, determinism, resumption, per-rank sharding, bucketing)."""

import json
import os

import numpy as np
import pytest
import torch

from soundstorm.training.corpus import (CorpusError, CorpusWriter, JoinedCorpus, join_utterances,
                                        open_corpus)
from soundstorm.training.data import (DataPosition, TrainStream, WindowSampler, collate,
                                      micro_batches, split_indices, WindowDataset)
from soundstorm.training.synthetic import SyntheticSpec, Voices, synthesize, write_synthetic_corpus

META = dict(num_quantizers=3, codebook_size=40, semantic_vocab_size=10)


def utterances(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = int(rng.integers(1, 60))
        S = (T - 1) // 2 + 1 + int(rng.integers(0, 2))    # 25 Hz ids for 50 Hz frames (+ slack)
        out.append(dict(id=f"u{i}", acoustic=rng.integers(0, 40, (T, 3)),
                        semantic=rng.integers(0, 10, S), speaker=int(rng.integers(0, 5))))
    return out


@pytest.fixture
def corpus_dir(tmp_path):
    utts = utterances(25)
    with CorpusWriter(tmp_path / "c", shard_frames=200, **META) as w:
        for u in utts:
            w.add(u["id"], u["acoustic"], u["semantic"], u["speaker"])
    return tmp_path / "c", utts


def test_round_trip_is_exact_and_memory_mapped(corpus_dir):
    path, utts = corpus_dir
    corpus = open_corpus(path)
    assert len(corpus) == 25 and len(corpus.shard_names) > 2      # several shards
    assert all(isinstance(a, np.memmap) for a in corpus._acoustic)
    for i, u in enumerate(utts):
        T = u["acoustic"].shape[0]
        a, s = corpus.read(i, 0, T)
        assert np.array_equal(a, u["acoustic"]) and a.dtype == np.int64
        assert np.array_equal(s, u["semantic"][:(T - 1) // 2 + 1])
        assert corpus.speaker[i] == u["speaker"] and corpus.ids[i] == u["id"]
    meta = json.loads((path / "corpus.json").read_text())
    assert meta["format"] == "soundstorm-tokens" and meta["num_quantizers"] == 3


def test_windows_stay_aligned_at_the_two_rates(corpus_dir):
    path, utts = corpus_dir
    corpus = open_corpus(path)
    sampler = WindowSampler(corpus, seed=1, min_frames=3, max_frames=20, batch_size=5)
    for epoch in range(3):
        for w in sampler.windows(epoch):
            T = corpus.frames[w.index]
            assert w.start % 2 == 0 and 1 <= w.frames <= min(20, T) and w.start + w.frames <= T
            assert w.frames >= min(3, T)
            a, s = corpus.read(w.index, w.start, w.frames)
            u = utts[w.index]
            assert np.array_equal(a, u["acoustic"][w.start:w.start + w.frames])
            # frame t of the window reads semantic id floor(t / 2) of the window, which is
            # the id floor((start + t) / 2) of the utterance
            t = np.arange(w.frames)
            assert np.array_equal(s[t // 2], u["semantic"][(w.start + t) // 2])


def test_window_lengths_cover_the_range(tmp_path):
    spec = SyntheticSpec(num_quantizers=2, min_seconds=2, max_seconds=2)
    corpus = open_corpus(write_synthetic_corpus(tmp_path / "c", 300, spec))
    sampler = WindowSampler(corpus, seed=0, min_frames=10, max_frames=60, batch_size=10)
    lengths = np.array([w.frames for w in sampler.windows(0)])
    assert lengths.min() == 10 and lengths.max() == 60
    assert abs(lengths.mean() - 35) < 3


def test_collate_pads_and_reports_lengths(corpus_dir):
    path, _ = corpus_dir
    corpus = open_corpus(path)
    ds = WindowDataset(corpus)
    sampler = WindowSampler(corpus, seed=0, min_frames=1, max_frames=50, batch_size=4)
    windows = sampler.windows(0)[:4]
    batch = collate([ds[w] for w in windows])
    T = max(w.frames for w in windows)
    assert batch.tokens.shape == (4, T, 3) and batch.semantic.shape == (4, (T - 1) // 2 + 1)
    assert batch.lengths.tolist() == [w.frames for w in windows]
    assert batch.keys.tolist() == [w.key for w in windows]
    for b, w in enumerate(windows):
        assert (batch.tokens[b, w.frames:] == 0).all()


def test_epochs_are_deterministic_and_resume_mid_epoch(corpus_dir):
    path, _ = corpus_dir
    corpus = open_corpus(path)
    make = lambda: WindowSampler(corpus, seed=7, min_frames=2, max_frames=30, batch_size=4,
                                 bucket_batches=2)
    a, b = make(), make()
    assert a.global_batches(0) == b.global_batches(0)
    assert a.global_batches(0) != a.global_batches(1)
    assert WindowSampler(corpus, seed=8, min_frames=2, max_frames=30,
                         batch_size=4).global_batches(0) != a.global_batches(0)
    assert a.batches_per_epoch() == 6 and len(a.global_batches(0)) == 6

    stream = TrainStream(a, rank=0, world_size=1, grad_accum=1)
    straight = []
    for i, (pos, micro) in zip(range(9), stream(DataPosition())):
        straight.append((pos, micro[0].keys.tolist(), micro[0].tokens.sum().item()))
    assert straight[5][0] == DataPosition(1, 0)           # epoch boundary
    resumed = []
    for i, (pos, micro) in zip(range(5), stream(straight[3][0])):
        resumed.append((pos, micro[0].keys.tolist(), micro[0].tokens.sum().item()))
    assert resumed == straight[4:9]


def test_bucketing_groups_similar_lengths(tmp_path):
    spec = SyntheticSpec(num_quantizers=2, min_seconds=0.5, max_seconds=4)
    corpus = open_corpus(write_synthetic_corpus(tmp_path / "c", 400, spec))
    kw = dict(seed=0, min_frames=25, max_frames=200, batch_size=8)
    padded = {}
    for bucket in (0, 10):
        s = WindowSampler(corpus, bucket_batches=bucket, **kw)
        batches = s.global_batches(0)
        assert sorted(w.key for b in batches for w in b) == sorted(w.key for w in s.windows(0))
        padded[bucket] = sum(len(b) * max(w.frames for w in b) - sum(w.frames for w in b)
                             for b in batches)
    assert padded[10] < padded[0] / 3


def test_ranks_and_micro_batches_partition_the_global_batch(corpus_dir):
    path, _ = corpus_dir
    corpus = open_corpus(path)
    batch = WindowSampler(corpus, seed=0, min_frames=1, max_frames=9,
                          batch_size=12).global_batches(0)[0]
    parts = [micro_batches(batch, r, 2, 3) for r in range(2)]
    flat = [w for r in range(2) for m in parts[r] for w in m]
    assert sorted(w.key for w in flat) == sorted(w.key for w in batch)
    assert all(len(m) == 2 for r in range(2) for m in parts[r])
    assert parts[1][0] == batch[2:4]                      # chunk m * world + rank


def test_split_is_deterministic_and_disjoint():
    a, b = split_indices(100, 0.1, 3)
    assert len(b) == 10 and not set(a) & set(b) and len(a) + len(b) == 100
    assert np.array_equal(split_indices(100, 0.1, 3)[1], b)


# -- errors -------------------------------------------------------------------------------
def test_missing_shard_is_named_or_skipped(corpus_dir):
    path, _ = corpus_dir
    (path / "shard-00001.acoustic.npy").unlink()
    with pytest.raises(CorpusError, match="shard file missing: .*shard-00001.acoustic.npy"):
        open_corpus(path)
    with pytest.warns(UserWarning) as caught:
        corpus = open_corpus(path, on_bad_shard="skip")
    assert any("skipping shard shard-00001" in str(w.message) for w in caught)
    assert corpus.skipped_shards == ["shard-00001"]
    assert "shard-00001" not in corpus.shard_names and len(corpus) < 25
    corpus.read(len(corpus) - 1, 0, 1)                    # the rest still reads


def test_truncated_shard_is_named(corpus_dir):
    path, _ = corpus_dir
    f = path / "shard-00000.acoustic.npy"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(CorpusError, match="shard-00000.acoustic.npy"):
        open_corpus(path)
    f.write_bytes(b"garbage")
    with pytest.raises(CorpusError, match="shard-00000.acoustic.npy is corrupt"):
        open_corpus(path)


def test_manifest_disagreeing_with_a_shard_is_reported(corpus_dir):
    path, _ = corpus_dir
    lines = (path / "manifest.jsonl").read_text().splitlines()
    e = json.loads(lines[0])
    e["frames"] += 1000
    e["duration"] = e["frames"] / 50
    (path / "manifest.jsonl").write_text("\n".join([json.dumps(e)] + lines[1:]) + "\n")
    with pytest.raises(CorpusError, match="manifest.jsonl:1 .*past the end of .*shard-00000"):
        open_corpus(path)
    with pytest.warns(UserWarning):
        assert "shard-00000" in open_corpus(path, on_bad_shard="skip").skipped_shards


def test_manifest_and_metadata_errors(corpus_dir):
    path, _ = corpus_dir
    lines = (path / "manifest.jsonl").read_text().splitlines()
    e = json.loads(lines[2])
    e["duration"] = 99.0
    (path / "manifest.jsonl").write_text("\n".join(lines[:2] + [json.dumps(e)] + lines[3:]) + "\n")
    with pytest.raises(CorpusError, match="manifest.jsonl:3 .*says duration 99.0"):
        open_corpus(path)
    (path / "manifest.jsonl").write_text("{not json\n")
    with pytest.raises(CorpusError, match="manifest.jsonl:1: not valid JSON"):
        open_corpus(path)
    (path / "manifest.jsonl").write_bytes(lines[0].encode() + b"\n" + b'{"id": "\xc3("}\n')
    with pytest.raises(CorpusError, match=r"manifest.jsonl:2: not UTF-8 text \(byte 0xc3 at "
                                          r"column 9\)"):
        open_corpus(path)
    (path / "manifest.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(CorpusError, match="manifest.jsonl:1: not a manifest entry .JSON nested "
                                          "too deeply"):
        open_corpus(path)
    meta = (path / "corpus.json").read_text()
    (path / "corpus.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CorpusError, match="corpus.json is not a soundstorm-tokens corpus: its "
                                          "JSON is nested too deeply"):
        open_corpus(path)
    (path / "corpus.json").write_text(meta)
    with pytest.raises(CorpusError, match="corpus directory not found"):
        open_corpus(path / "nope")
    (path / "corpus.json").unlink()
    with pytest.raises(CorpusError, match="corpus.json not found"):
        open_corpus(path)


def test_out_of_range_tokens_in_a_shard_are_reported_on_read(corpus_dir):
    path, _ = corpus_dir
    arr = np.load(path / "shard-00000.acoustic.npy")
    arr[0, 0] = 999
    np.save(path / "shard-00000.acoustic.npy", arr)
    corpus = open_corpus(path)
    with pytest.raises(CorpusError, match="shard-00000.acoustic.npy: utterance 'u0' holds ids"):
        corpus.read(0, 0, 1)


def test_writer_rejects_bad_utterances(tmp_path):
    w = CorpusWriter(tmp_path / "c", **META)
    with pytest.raises(ValueError, match="acoustic must be"):
        w.add("a", np.zeros((5, 2), int), np.zeros(3, int))
    with pytest.raises(ValueError, match="ids must lie in 0..39"):
        w.add("a", np.full((5, 3), 40), np.zeros(3, int))
    with pytest.raises(ValueError, match="too few for 5 frames"):
        w.add("a", np.zeros((5, 3), int), np.zeros(2, int))
    w.add("a", np.zeros((5, 3), int), np.zeros(3, int))
    with pytest.raises(ValueError, match="must be a new non-empty string"):
        w.add("a", np.zeros((5, 3), int), np.zeros(3, int))
    w.close()
    with pytest.raises(FileExistsError):
        CorpusWriter(tmp_path / "c", **META)


def test_synthetic_structure():
    spec = SyntheticSpec(noise=0.0)
    voices = Voices.make(spec, 0)
    rng = np.random.default_rng(0)
    a, s = synthesize(spec, voices, 2, 80, rng)
    per = spec.codebook_size // spec.num_speakers
    assert ((a[:, 0] >= 2 * per) & (a[:, 0] < 3 * per)).all()       # speaker 2's codes
    assert np.array_equal(a[:, 0], voices.level1[2, s[np.arange(80) // 2]])
    for q in range(1, spec.num_quantizers):
        assert np.array_equal(a[:, q], voices.permutations[q - 1, a[:, q - 1]])
    b, _ = synthesize(spec, voices, 1, 80, np.random.default_rng(0))   # same ids, other voice
    assert not np.array_equal(a[:, 0], b[:, 0])


def test_worker_processes_load_the_same_batches(corpus_dir):
    path, _ = corpus_dir
    corpus = open_corpus(path)
    sampler = WindowSampler(corpus, seed=3, min_frames=2, max_frames=30, batch_size=4)
    got = {}
    for workers in (0, 2):
        stream = TrainStream(sampler, rank=1, world_size=2, grad_accum=1, num_workers=workers)
        got[workers] = [(pos, [(b.tokens, b.semantic, b.keys) for b in micro])
                        for _, (pos, micro) in zip(range(8), stream(DataPosition(0, 2)))]
    for (p0, m0), (p2, m2) in zip(got[0], got[2]):
        assert p0 == p2
        for x, y in zip(m0[0], m2[0]):
            assert torch.equal(x, y)


_FORKS = {"counting": False, "forks": 0}


def _count_fork():
    if _FORKS["counting"]:
        _FORKS["forks"] += 1


os.register_at_fork(before=_count_fork)


def test_workers_start_without_forking_jaxs_threads(corpus_dir):
    """Once JAX runs in the process (its threads started), workers come from a fresh
    server process instead of a fork of this one, which could deadlock."""
    jnp = pytest.importorskip("jax.numpy")
    jnp.ones(2).block_until_ready()
    path, _ = corpus_dir
    sampler = WindowSampler(open_corpus(path), seed=3, min_frames=2, max_frames=30,
                            batch_size=4)
    got = {}
    _FORKS.update(counting=True, forks=0)
    try:
        for workers in (0, 2):
            stream = TrainStream(sampler, rank=0, world_size=1, grad_accum=1,
                                 num_workers=workers)
            got[workers] = [micro[0].tokens for _, (_, micro) in
                            zip(range(3), stream(DataPosition()))]
    finally:
        _FORKS["counting"] = False
    assert _FORKS["forks"] == 0
    for a, b in zip(got[0], got[2]):
        assert torch.equal(a, b)


def _frame_streams(utts, parts):
    """The acoustic frames and per-frame semantic ids of utterances `parts` joined, built
    directly from the utterances: every part but the last cut to an even length."""
    acoustic, per_frame = [], []
    for j, i in enumerate(parts):
        a, sem = utts[i]["acoustic"], utts[i]["semantic"]
        T = a.shape[0] if j == len(parts) - 1 else a.shape[0] // 2 * 2
        acoustic.append(a[:T])
        per_frame.append(sem[np.arange(T) // 2])
    return np.concatenate(acoustic), np.concatenate(per_frame)


@pytest.mark.parametrize("n", [2, 3])
def test_joined_utterances_read_as_one_recording(corpus_dir, n):
    path, utts = corpus_dir
    joined = join_utterances(open_corpus(path), n)
    assert isinstance(joined, JoinedCorpus) and len(joined) == len(utts)
    speakers = [u["speaker"] for u in utts]
    for i in range(len(utts)):
        same = [k for k in range(len(utts)) if speakers[k] == speakers[i]]
        at = same.index(i)
        parts = [same[(at + j) % len(same)] for j in range(min(n, len(same)))]
        assert joined.ids[i] == "+".join(utts[k]["id"] for k in parts)
        assert joined.speaker[i] == speakers[i]
        want_a, want_s = _frame_streams(utts, parts)
        T = int(joined.frames[i])
        assert T == len(want_a)
        for start in range(0, T, 2):
            for frames in sorted({1, 2, 7, T - start}):
                if frames < 1 or start + frames > T:
                    continue
                a, s = joined.read(i, start, frames)
                assert np.array_equal(a, want_a[start:start + frames])
                assert len(s) == (frames - 1) // 2 + 1
                t = np.arange(frames)
                assert np.array_equal(s[t // 2], want_s[start + t])
        with pytest.raises(ValueError, match="not an aligned window of joined utterance"):
            joined.read(i, 1, 1)
        with pytest.raises(ValueError, match="not an aligned window"):
            joined.read(i, 0, T + 1)


def test_joined_utterances_feed_the_sampler_longer_windows(corpus_dir):
    path, _ = corpus_dir
    corpus = open_corpus(path)
    joined = join_utterances(corpus, 3)
    assert joined.total_frames > 2 * corpus.total_frames
    sampler = WindowSampler(joined, seed=0, min_frames=40, max_frames=150, batch_size=5)
    windows = sampler.windows(0)
    assert len(windows) == len(corpus)
    assert max(w.frames for w in windows) > int(corpus.frames.max())
    for w in windows:
        a, s = joined.read(w.index, w.start, w.frames)
        assert a.shape == (w.frames, 3) and len(s) == (w.frames - 1) // 2 + 1


def test_join_groups_and_settings(corpus_dir):
    path, utts = corpus_dir
    corpus = open_corpus(path)
    assert join_utterances(corpus, 1) is corpus
    for bad in (0, -1, 1.0, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"utterances must be an integer >= 1, got {bad!r}"):
            join_utterances(corpus, bad)
    with pytest.raises(ValueError, match="groups must hold one label per utterance"):
        join_utterances(corpus, 2, np.zeros(3))
    groups = np.arange(len(utts)) % 2
    joined = join_utterances(corpus, 4, groups)
    for i, name in enumerate(joined.ids):
        members = [int(x[1:]) for x in name.split("+")]
        assert members[0] == i
        assert all(groups[k] == groups[i] and utts[k]["speaker"] == utts[i]["speaker"]
                   for k in members)
