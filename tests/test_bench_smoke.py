"""Every benchmark runs end to end at the tiny preset. No timing is asserted: benchmarks
measure, tests only check that they run and report what they promise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from soundstorm.engine import ModelConfig
from soundstorm.engine.benchmark import read_history
from soundstorm.kernels import available_backends
from soundstorm.cli import main

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import ar_baseline  # noqa: E402
import compare  # noqa: E402
import runtime_figure  # noqa: E402

FIGURES = ("wall_s", "real_time_factor", "frames_per_s", "forward_passes", "achieved_gflops",
           "matmul_gflops", "fraction_of_matmul")


def test_cli_bench_json_and_history(tmp_path, capsys):
    history = tmp_path / "h.jsonl"
    for seconds in (1, 1):
        assert main(["bench", "--preset", "tiny", "--seconds", str(seconds), "--repeats", "1",
                     "--quiet", "--json", "--history", str(history)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["forward_passes"] == 19 and result["frames"] == 50
    assert all(result[k] > 0 for k in FIGURES)
    records = read_history(history)
    assert len(records) == 2
    assert records[0]["settings"] == {"preset": "tiny", "seconds": 1.0, "batch": 1,
                                      "backend": available_backends(torch.device("cpu"))[0],
                                      "dtype": "float32", "device": "cpu"}
    assert "quantize" not in records[0]["figures"]
    assert records[0]["machine"]["cores"] >= 1 and "time" in records[0]

    assert compare.main([str(history), "--plot", str(tmp_path / "h.png")]) == 0
    text = capsys.readouterr().out
    assert "real-time factor" in text and "fraction of matmul" in text
    assert (tmp_path / "h.png").stat().st_size > 1000
    with pytest.raises(SystemExit, match="the history has 2 records"):
        compare.main([str(history), "--against", "5"])


def test_bad_history_is_reported_with_its_line(tmp_path):
    path = tmp_path / "h.jsonl"
    path.write_text('{"settings": {}, "figures": {}}\nnot json\n')
    with pytest.raises(SystemExit, match="h.jsonl:2: not a JSON record"):
        compare.main([str(path)])
    path.write_bytes(b'{"settings": {}, "figures": {}}\n' + b"[" * 100_000 + b"\n")
    with pytest.raises(SystemExit, match="h.jsonl:2: not a benchmark record .JSON nested too deeply"):
        compare.main([str(path)])
    path.write_bytes(b'{"settings": {}, "figures": {}}\n{"settings": "\xff"}\n')
    with pytest.raises(SystemExit, match="h.jsonl:2: not UTF-8 text"):
        compare.main([str(path)])


def test_cli_bench_rejects_bad_settings(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tiny", "--seconds", "0"])
    assert "--seconds must be a finite number of seconds > 0, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tiny", "--seconds", "20"])
    assert "--seconds 20: the tiny preset holds at most 5.12 s (256 frames)" in \
        capsys.readouterr().err


def test_max_seconds_is_what_a_preset_holds():
    from soundstorm.engine.benchmark import bench_inputs, default_seconds, max_seconds
    from soundstorm.engine import Engine

    tiny = ModelConfig.preset("tiny")
    assert max_seconds(tiny) == 5.12 and default_seconds(tiny) == 5.12
    assert max_seconds(ModelConfig.preset("small")) == 30 and default_seconds(ModelConfig.preset("paper")) == 10
    engine = Engine.from_preset("tiny")
    assert tiny.frames_for(bench_inputs(engine, max_seconds(tiny), 1).shape[1]) == tiny.max_frames
    assert tiny.frames_for(bench_inputs(engine, 5.13, 1).shape[1]) > tiny.max_frames


def history_record(commit: str, rtf: float, spread: float = 0.0, **settings) -> dict:
    """A synthetic history record: wall time = rtf (1 s of audio), rounds within +-spread."""
    wall = rtf
    return {"commit": commit, "machine": {"host": "m"},
            "settings": {"preset": "tiny", "seconds": 1.0, "batch": 1, "backend": "torch",
                         "dtype": "float32", "device": "cpu", **settings},
            "figures": {"wall_s": wall, "wall_s_min": wall * (1 - spread),
                        "wall_s_max": wall * (1 + spread), "real_time_factor": rtf,
                        "frames_per_s": 50 / wall, "achieved_gflops": 1 / wall,
                        "matmul_gflops": 2.0, "fraction_of_matmul": 0.5 / wall,
                        "fraction_min": 0.5 / wall / (1 + spread),
                        "fraction_max": 0.5 / wall / (1 - spread)}}


def verdicts(text: str) -> dict:
    """label -> the verdict at the end of its row of the comparison table."""
    out = {}
    for line in text.splitlines():
        for label in ("real-time factor", "frames/s", "fraction of matmul", "torch.matmul"):
            if line.strip().startswith(label):
                out[label] = line.split("%")[-1].strip()
    return out


def write_history(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_compare_flags_only_changes_beyond_the_noise(tmp_path, capsys):
    # 8 % slower, but each record's rounds spread 10 %: noise, not a regression
    h = write_history(tmp_path / "a.jsonl", [history_record("aaa", 1.00, spread=0.10),
                                             history_record("bbb", 1.08, spread=0.10)])
    assert compare.main([str(h)]) == 0
    text = capsys.readouterr().out
    assert verdicts(text)["real-time factor"] == "within noise", text
    assert verdicts(text)["frames/s"] == "within noise"
    assert verdicts(text)["torch.matmul"] == ""            # unchanged
    assert "±20.0%" in text                                 # (1.1 - 0.9) / 1.0
    # the same 8 % from records that agree to 1 %: a regression
    h = write_history(tmp_path / "b.jsonl", [history_record("aaa", 1.00, spread=0.005),
                                             history_record("bbb", 1.08, spread=0.005)])
    compare.main([str(h)])
    assert verdicts(capsys.readouterr().out) == {
        "real-time factor": "worse", "frames/s": "worse", "torch.matmul": "",
        "fraction of matmul": "worse"}
    # faster by 30 %: better, whatever the noise
    h = write_history(tmp_path / "c.jsonl", [history_record("aaa", 1.00, spread=0.10),
                                             history_record("bbb", 0.70, spread=0.10)])
    compare.main([str(h)])
    assert verdicts(capsys.readouterr().out)["real-time factor"] == "better"
    # below the threshold nothing is flagged, even from noiseless records
    h = write_history(tmp_path / "d.jsonl", [history_record("aaa", 1.00),
                                             history_record("bbb", 1.015)])
    compare.main([str(h)])
    assert verdicts(capsys.readouterr().out)["real-time factor"] == ""
    compare.main([str(h), "--threshold", "1"])
    assert verdicts(capsys.readouterr().out)["real-time factor"] == "worse"


def test_compare_counts_repeated_records_of_a_commit_as_noise(tmp_path, capsys):
    # each record alone is tight (0.5 %), but three runs of commit aaa range from 0.92 to
    # 1.08: the newest commit's 1.06 is inside that
    runs = [history_record("aaa", rtf, spread=0.005) for rtf in (0.92, 1.08, 1.00)]
    h = write_history(tmp_path / "h.jsonl", runs + [history_record("aaa", 5.0, batch=8),
                                                   history_record("bbb", 1.06, spread=0.005)])
    compare.main([str(h), "--against", "aaa"])
    text = capsys.readouterr().out
    assert "batch 1" in text and verdicts(text)["real-time factor"] == "within noise", text
    assert "±17.0%" in text                    # (1.08 * 1.005 - 0.92 * 0.995) / 1.00
    with pytest.raises(SystemExit):
        compare.main([str(h), "--threshold", "nan"])


@pytest.mark.parametrize("case", ["tiny-5s-b1-torch-float32", "tiny-5s-b1-torch-int8"])
def test_rtf_suite_runs_a_tiny_case(tmp_path, case):
    out = tmp_path / "rtf.json"
    r = subprocess.run([sys.executable, "-m", "pytest", str(BENCH / "test_rtf.py"), "-q",
                        "-p", "no:cacheprovider", "-k", case,
                        "--rounds", "1", f"--benchmark-json={out}"],
                       capture_output=True, text=True, cwd=BENCH.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    bench = json.loads(out.read_text())["benchmarks"]
    assert len(bench) == 1 and bench[0]["extra_info"]["forward_passes"] == 19
    assert bench[0]["extra_info"]["fraction_of_matmul"] > 0
    if case.endswith("int8"):
        assert bench[0]["extra_info"]["quantize"] == "int8"
        assert bench[0]["extra_info"]["fraction_of_int8_matmul"] > 0
    else:
        assert "fraction_of_int8_matmul" not in bench[0]["extra_info"]


def test_default_rtf_cases_skip_the_slow_ones():
    import test_rtf
    ids = {p.id: p.marks for p in test_rtf.cases()}
    backends = test_rtf.available_backends(test_rtf.DEVICE)
    int8 = len(set(backends) & set(test_rtf.INT8_BACKENDS))
    assert len(ids) == 3 * 3 * 2 * (len(test_rtf.DTYPES) * len(backends) + int8)
    if test_rtf.DEVICE.type == "cpu":
        assert not ids["tiny-5s-b8-torch-float32"] and not ids["small-5s-b1-torch-float32"]
        assert ids["paper-30s-b8-torch-float32"] and ids["small-10s-b1-torch-bfloat16"]
        assert not ids["small-10s-b1-cpp-int8"] and not ids["small-10s-b1-torch-int8"]
    # the tiny preset holds 5.12 s: its longer cases are skipped, saying why
    for length in ("10s", "30s"):
        (mark,) = ids[f"tiny-{length}-b1-torch-float32"]
        assert mark.name == "skip" and "tiny preset holds at most 5.12 s" in mark.kwargs["reason"]


def test_ar_baseline_generates_every_level():
    cfg = ModelConfig.preset("tiny")
    ar = ar_baseline.AudioLMAcoustic(cfg, max_seconds=2, window_s=0.3)
    semantic = torch.randint(0, cfg.semantic_vocab_size, (2, 19))
    tokens = ar.generate(semantic)
    assert tokens.shape == (2, 38, cfg.num_quantizers)
    assert ((tokens >= 0) & (tokens < cfg.codebook_size)).all()
    assert ar.forward_passes(38) == 38 * cfg.num_quantizers
    with pytest.raises(ValueError, match="exceeds max_len"):
        ar.generate(torch.zeros(1, 60, dtype=torch.long))


def test_ar_cache_matches_a_full_causal_pass():
    """The KV-cached step equals recomputing the causal Transformer over the whole prefix."""
    cfg = ModelConfig.preset("tiny")
    stage = ar_baseline.ARStage(cfg, max_len=12).double()
    rows = torch.randint(0, 40, (2, 12))
    dh = cfg.head_dim
    full = stage.embed(rows)
    caches = [(torch.empty(2, cfg.heads, 12, dh, dtype=torch.float64),
               torch.empty(2, cfg.heads, 12, dh, dtype=torch.float64)) for _ in stage.blocks]
    cos, sin = ar_baseline.rotary_tables(12, dh, rows.device, torch.float64)
    with torch.no_grad():
        for block, (k, v) in zip(stage.blocks, caches):
            full = block(full, 0, k, v, cos, sin)
        caches = [(torch.empty_like(k), torch.empty_like(v)) for k, v in caches]
        x = stage.embed(rows[:, :5])
        steps = []
        for block, (k, v) in zip(stage.blocks, caches):
            x = block(x, 0, k, v, cos, sin)
        steps.append(x)
        for t in range(5, 12):
            x = stage.embed(rows[:, t:t + 1])
            for block, (k, v) in zip(stage.blocks, caches):
                x = block(x, t, k, v, cos, sin)
            steps.append(x)
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_runtime_figure_at_the_tiny_preset(tmp_path):
    result = runtime_figure.measure("tiny", [0.5, 1.0], repeats=1, ar_repeats=1)
    assert [r["seconds"] for r in result["rows"]] == [0.5, 1.0]
    assert all(r["speedup"] > 0 and r["ar_passes"] == r["frames"] * 4 for r in result["rows"])
    assert runtime_figure.table(result).count("\n") == 3
    runtime_figure.plot(result, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_scheduler_benchmark_at_the_tiny_preset(tmp_path):
    import bench_scheduler
    result = bench_scheduler.measure("tiny", [1, 3], ["short"])
    assert [r["concurrency"] for r in result["rows"]] == [1, 3]
    for r in result["rows"]:
        assert r["scheduler_throughput"] > 0 and r["sequential_throughput"] > 0
        assert r["scheduler_latency_max_s"] <= r["scheduler_wall_s"] + 1e-6
    assert bench_scheduler.table(result).count("\n") == 3
    bench_scheduler.plot(result, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_graph_memory_table(capsys):
    import graph_memory

    graph_memory.main(["--preset", "paper", "tiny", "--max-batch", "1", "8", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 8
    for r in rows:
        assert 0 < r["shared_pool_bytes"] < r["private_pools_bytes"]
        assert r["graphs"] == 2 * r["buckets"]
    paper8 = next(r for r in rows if r["preset"] == "paper" and r["max_batch"] == 8
                  and r["dtype"] == "float32")
    assert paper8["private_pools_bytes"] > 4 * 2 ** 30 > 2 ** 30 > paper8["shared_pool_bytes"]
    with pytest.raises(SystemExit):
        graph_memory.main(["--max-batch", "0"])


def test_cpu_speed_compares_the_cpu_variants_side_by_side(capsys, tmp_path):
    import cpu_speed
    pytest.importorskip("soundstorm.kernels.cpp", reason="the C++ extension is not built",
                        exc_type=ImportError)
    assert cpu_speed.main(["--preset", "tiny", "--seconds", "0.4", "--batch", "2",
                           "--rounds", "1", "--cpu-time", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    for name in ("torch-float32", "cpp-float32", "cpp-int8", "of int8 mm"):
        assert name in out
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["variants"]) == {"torch-float32", "cpp-float32", "cpp-int8"}
    assert r["batch"] == 2 and r["clock"] == "process CPU time"
    assert r["variants"]["torch-float32"]["speedup_over_torch_float32"] == 1.0
    assert all(v["fraction_of_int8_matmul"] > 0 for v in r["variants"].values())


def test_codec_quality_scores_a_fitted_codec_with_both_decoders(tmp_path):
    """--codec: the shipped codec on a held-out voice's sentence, Griffin-Lim and vocoder."""
    pytest.importorskip("pystoi")
    from speech import require_espeak
    require_espeak()
    import codec_quality
    from soundstorm.demo import ASSETS

    codec_quality.main(["--codec", str(ASSETS / "codec"), "--sentences", "1",
                        "--out", str(tmp_path)])
    r = json.loads((tmp_path / "results.json").read_text())
    assert [row["q"] for row in r["per_q"]] == list(range(1, r["num_quantizers"] + 1))
    for row in r["per_q"]:
        assert {"lsd_db", "stoi", "vocoder_lsd_db", "vocoder_stoi"} <= set(row)
    assert r["vocoder_ceiling"]["stoi"] > 0 and r["held_out_clips"] == 1
    assert r["speed"]["vocoder_decode_rtf"] > 0 and r["speed"]["griffin-lim_decode_rtf"] > 0
    assert (tmp_path / "error_vs_q.png").read_bytes()[:4] == b"\x89PNG"


def test_voice_levels_scores_each_level_and_the_decode_after_the_true_level_1(tmp_path,
                                                                              capsys):
    from speech import require_espeak
    require_espeak()
    import voice_levels

    r = voice_levels.main(["--utterances", "1", "--reference-voices", "3",
                           "--out", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text()) == r
    Q = 4
    assert list(r["rows"]) == [f"truth levels 1..{k}" for k in range(1, Q + 1)] + [
        "generated", "generated L1 + truth finer", "truth L1 + generated finer",
        "truth L1 + prompt's finer", "generated L1 + prompt's finer"]
    assert r["reference_voices"] == 4          # the prompt's voice and 3 others
    for row in r["rows"].values():
        assert len(row["ranks"]) == 1 and 1 <= row["ranks"][0] <= 4
        assert row["identified"] == (row["ranks"][0] == 1)
        assert -1 <= row["others"] <= 1 and -1 <= row["same"] <= 1
    # the decode after the true level 1 keeps it, and decodes the finer levels itself
    forced = r["token_accuracy"]["truth L1 + generated finer"]
    assert forced[0] == 1.0 and len(forced) == Q and max(forced[1:]) < 1
    assert len(r["token_accuracy"]["generated"]) == Q
    copied = r["token_accuracy"]["truth L1 + prompt's finer"]
    assert copied[0] == 1.0 and len(copied) == Q and max(copied[1:]) < 1
    assert "truth L1 + generated finer" in capsys.readouterr().out
    # a model the assets' codec cannot decode is named
    from soundstorm.engine import ModelConfig, SoundStorm
    SoundStorm(ModelConfig.preset("tiny")).save_pretrained(tmp_path / "tiny")
    with pytest.raises(SystemExit):
        voice_levels.main(["--model", str(tmp_path / "tiny"), "--utterances", "1"])
    assert "has 4 levels of 32 codes over 16 semantic ids" in capsys.readouterr().err


def test_copy_from_prompt_takes_the_finer_levels_of_the_nearest_prompt_frame():
    import voice_levels

    class Codec:   # level-1 codewords on a line: the codeword of code c is c
        def dequantize(self, tokens):
            return tokens[..., :1].float()

    prompt = torch.tensor([[0, 10, 11, 12], [5, 20, 21, 22], [9, 30, 31, 32]])
    tokens = torch.tensor([[9, 0, 0, 0], [9, 0, 0, 0], [4, 0, 0, 0], [1, 0, 0, 0]])
    out = voice_levels.copy_from_prompt(Codec(), tokens, prompt)
    assert torch.equal(out[:, 0], tokens[:, 0])               # level 1 kept
    # contexts (prev/2, self, next/2): frame 0 (4.5, 9, 4.5) is nearest prompt frame 2
    # (2.5, 9, 4.5); frame 3 (2, 1, 0.5) nearest prompt frame 0 (0, 0, 2.5)
    assert out[:, 1:].tolist() == [[30, 31, 32], [30, 31, 32], [20, 21, 22], [10, 11, 12]]


def test_lookup_vote_reads_the_finer_codes_of_the_prompt_frame_with_the_same_context():
    import voice_levels
    from soundstorm.engine.model import SoundStorm

    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", prompt_lookup=64)
    model = SoundStorm(cfg).eval()
    with torch.no_grad():
        model.lookup.log_scale.fill_(6.0)            # a sharp lookup: the twin dominates
    C, Q = cfg.codebook_size, cfg.num_quantizers
    prompt = torch.stack([torch.randperm(C)[:20]] + [torch.randint(0, C, (20,))
                                                     for _ in range(Q - 1)], 1)
    tokens = torch.cat([prompt[5:15, :1], torch.zeros(10, Q - 1, dtype=torch.long)], 1)
    out = voice_levels.lookup_vote(model, tokens, prompt)
    assert torch.equal(out[:, 0], tokens[:, 0])
    # the inner frames have a prompt twin with the same context on both sides
    assert torch.equal(out[1:-1, 1:], prompt[6:14, 1:])


def test_copy_gates_are_the_mean_gate_of_each_finer_level_in_its_decoding_state():
    import voice_levels
    from soundstorm.engine.model import SoundStorm

    torch.manual_seed(1)
    cfg = ModelConfig.preset("tiny", prompt_lookup=8)
    model = SoundStorm(cfg).eval()
    C, Q = cfg.codebook_size, cfg.num_quantizers
    with torch.no_grad():
        model.lookup.copy_bias.copy_(torch.tensor([-2.0, 0.0, 3.0]))
    prompt = torch.randint(0, C, (1, 12, Q))
    tokens = torch.randint(0, C, (10, Q))
    semantic = torch.randint(0, cfg.semantic_vocab_size, (1, 22))
    gates = voice_levels.copy_gates(model, semantic, prompt, tokens)
    # the weights are 0 at init: each gate is its bias's sigmoid, whatever the state
    assert gates == pytest.approx(torch.sigmoid(torch.tensor([-2.0, 0.0, 3.0])).tolist())
    with torch.no_grad():
        model.lookup.copy_weight.normal_(std=0.05)
    gates = voice_levels.copy_gates(model, semantic, prompt, tokens)
    assert len(gates) == Q - 1 and all(0 < g < 1 for g in gates)
    assert not model.norm._forward_hooks                     # the hook is removed
