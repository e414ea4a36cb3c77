import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from soundstorm.engine import Engine
from soundstorm.cli import main

from conftest import random_codes, random_semantic


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_from_a_model_directory_matches_the_api(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path / "model")
    cfg = tiny_model.config
    semantic = random_semantic(cfg, 1, 12)[0]
    prompt = random_codes(cfg, 5, cfg.num_quantizers)
    np.save(tmp_path / "sem.npy", semantic.numpy().astype(np.int32))
    np.save(tmp_path / "prompt.npy", prompt.numpy())
    code, out, _ = run_cli(capsys, "generate", "--model", tmp_path / "model", "--semantic",
                           tmp_path / "sem.npy", "--prompt", tmp_path / "prompt.npy",
                           "--steps", "3", "--seed", 11, "--out", tmp_path / "o" / "tok.npy",
                           "--json", "--quiet")
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["forward_passes"] == 3 + cfg.num_quantizers - 1
    assert summary["frames"] == 24 and summary["real_time_factor"] > 0
    tokens = np.load(tmp_path / "o" / "tok.npy")
    assert tokens.shape == (24, cfg.num_quantizers) and tokens.dtype == np.int64
    from soundstorm.engine import DecodeConfig
    want = Engine(tmp_path / "model").generate(
        semantic[None], prompt=prompt[None], seed=11,
        decode=DecodeConfig(steps_per_level=(3, 1, 1, 1)))
    assert np.array_equal(tokens, want[0].numpy())


def test_generate_with_a_preset_and_random_semantic(tmp_path, capsys):
    code, out, err = run_cli(capsys, "generate", "--preset", "tiny", "--seconds", 2,
                             "--batch", 2, "--seed", 0, "--out", tmp_path / "t.npy")
    assert code == 0
    assert "real-time factor" in out and "decoding" in err   # progress bar on stderr
    assert np.load(tmp_path / "t.npy").shape == (2, 100, 4)


@pytest.mark.parametrize("argv,match", [
    (["generate", "--model", "nowhere"], "model directory not found: nowhere"),
    (["generate", "--preset", "tiny", "--semantic", "missing.npy"], "--semantic: file not found"),
    (["generate", "--preset", "tiny", "--steps", "a,b"], "--steps must be comma-separated ints"),
    (["generate", "--preset", "tiny", "--steps", "4,1"], "decode.steps_per_level has 2 entries"),
    (["generate", "--preset", "tiny", "--seconds", "-1"], "--seconds must be a finite number of seconds > 0, got -1"),
    (["generate", "--preset", "tiny", "--seconds", "nan"], "--seconds must be a finite number of seconds > 0, got nan"),
    (["generate", "--preset", "tiny", "--seconds", "inf"], "--seconds must be a finite number of seconds > 0, got inf"),
    (["generate", "--preset", "tiny", "--seconds", "6"], r"--seconds 6: this model holds at most 5.12 s \(256 frames\)"),
    (["generate", "--preset", "tiny", "--batch", "-1"], "--batch must be an integer >= 1, got -1"),
    (["generate", "--preset", "tiny", "--batch", "0"], "--batch must be an integer >= 1, got 0"),
    (["generate", "--preset", "tiny", "--steps", ""], "--steps must be comma-separated ints such as 16 or 16,1,1; got ''"),
    (["generate", "--preset", "tiny", "--device", "gpu"], "--device 'gpu' is not a device; expected cpu, cuda"),
    (["generate", "--preset", "tiny", "--seconds", "ten"], r"argument --seconds: invalid float value: 'ten' \(see soundstorm generate --help\)"),
    (["bench", "--preset", "tiny", "--seconds", "nan"], "--seconds must be a finite number of seconds > 0, got nan"),
    (["bench", "--preset", "tiny", "--batch", "0"], "--batch must be an integer >= 1, got 0"),
    (["bench", "--preset", "tiny", "--seconds", "10"], r"--seconds 10: the tiny preset holds at most 5.12 s \(256 frames\)"),
    (["generate", "--preset", "tiny", "--temperature", "-1"], "temperature must be >= 0"),
    (["info", "neither"], "'neither' is neither a model directory"),
    (["generate", "--preset", "tiny", "--quantize", "int8", "--dtype", "bf16"],
     "quantize='int8' runs float32 models on the CPU"),
    (["bench", "--preset", "tiny", "--quantize", "int4"],
     r"argument --quantize: invalid choice: 'int4' \(choose from 'none', 'int8'\)"),
    (["demo", "--quantize", "fp8"], "argument --quantize: invalid choice: 'fp8'"),
])
def test_errors_are_one_line_with_exit_status_2(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert re.search(match, err), err


def test_bad_npy_files(tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.zeros(10, dtype=np.float32))
    np.save(tmp_path / "cube.npy", np.zeros((1, 2, 3, 4), dtype=np.int64))
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    for name, match in (("f.npy", "holds float32, expected integer ids"),
                        ("cube.npy", r"has shape \(1, 2, 3, 4\)"),
                        ("junk.npy", "is not a readable .npy array")):
        with pytest.raises(SystemExit):
            main(["generate", "--preset", "tiny", "--semantic", str(tmp_path / name)])
        assert re.search(match, capsys.readouterr().err)


def test_info(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path)
    code, out, _ = run_cli(capsys, "info", tmp_path, "--json")
    info = json.loads(out)
    assert info["parameters"] == tiny_model.num_parameters
    assert info["config"]["dim"] == 64 and info["weights_bytes"] > 0
    code, out, _ = run_cli(capsys, "info", "paper")
    assert "353,938,432" in out


def test_console_script_help():
    exe = [sys.executable, "-m", "soundstorm.cli"]
    for argv in ([], ["generate"], ["info"]):
        r = subprocess.run(exe + argv + ["--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: soundstorm" in r.stdout


def test_generate_a_batch_manifest(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path / "model")
    cfg = tiny_model.config
    lines = []
    for i, S in enumerate((7, 30, 12)):
        np.save(tmp_path / f"s{i}.npy", random_semantic(cfg, 1, S, seed=i)[0].numpy())
        entry = {"semantic": f"s{i}.npy", "seed": 100 + i}
        if i == 1:
            np.save(tmp_path / "p.npy", random_codes(cfg, 9, cfg.num_quantizers).numpy())
            entry["prompt"] = "p.npy"
        if i < 2:
            entry["out"] = f"out/u{i}.npy"
        lines.append(json.dumps(entry))
    (tmp_path / "batch.jsonl").write_text("\n".join(lines) + "\n")
    code, out, _ = run_cli(capsys, "generate", "--model", tmp_path / "model", "--manifest",
                           tmp_path / "batch.jsonl", "--steps", "3", "--max-batch", 2,
                           "--out", tmp_path / "rest", "--quiet", "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["utterances"] == 3
    engine = Engine(tmp_path / "model")
    from soundstorm.engine import DecodeConfig
    decode = DecodeConfig(steps_per_level=(3, 1, 1, 1))
    for i, path in enumerate((tmp_path / "out" / "u0.npy", tmp_path / "out" / "u1.npy",
                              tmp_path / "rest" / "00002.npy")):
        sem = torch.from_numpy(np.load(tmp_path / f"s{i}.npy"))[None]
        prompt = torch.from_numpy(np.load(tmp_path / "p.npy"))[None] if i == 1 else None
        want = engine.generate(sem, prompt=prompt, decode=decode, seed=100 + i)[0]
        assert np.array_equal(np.load(path), want.numpy()), path


@pytest.mark.parametrize("line,match", [
    ("{not json", r"batch.jsonl:2: not a JSON object"),
    ('{"prompt": "x.npy"}', r"batch.jsonl:2: expected an object with at least \"semantic\""),
    ('{"semantic": "s.npy", "speed": 2}', r"batch.jsonl:2: unknown key\(s\) \['speed'\]"),
    ('{"semantic": "missing.npy"}', "file not found"),
    ('{"semantic": "bad.npy"}', r"batch.jsonl:2: semantic\[0, 0\] = 99 is out of range"),
    ('{"semantic": "s.npy", "prompt": ""}', r'batch.jsonl:2: "prompt" must be a non-empty path string, got ""; leave the key out'),
    ('{"semantic": 5}', r'batch.jsonl:2: "semantic" must be a non-empty path string, got 5'),
    ('{"semantic": "s.npy", "out": ["a.npy"]}', r'batch.jsonl:2: "out" must be a non-empty path string, got \["a.npy"\]'),
    ('{"semantic": "s.npy", "seed": "7"}', r'batch.jsonl:2: "seed" must be an integer, got "7"'),
    ("[" * 100_000, r"batch.jsonl:2: JSON nested too deeply"),
    ('{"semantic": ' * 100_000, r"batch.jsonl:2: JSON nested too deeply"),
])
def test_bad_manifest_lines_are_named(tmp_path, tiny_model, capsys, line, match):
    tiny_model.save_pretrained(tmp_path / "model")
    np.save(tmp_path / "s.npy", np.arange(5))
    np.save(tmp_path / "bad.npy", np.full(5, 99))
    (tmp_path / "batch.jsonl").write_text('{"semantic": "s.npy"}\n' + line + "\n")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", str(tmp_path / "model"), "--manifest",
              str(tmp_path / "batch.jsonl")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err), err


def one_line_error(capsys, *argv) -> str:
    """Run the command; it must fail with exit status 2 and one line on stderr."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory in which no file can be created: read-only for a normal user; for root,
    who may write anywhere, /proc (Linux)."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    d = Path("/proc")
    try:
        (d / "soundstorm-probe").touch()
    except OSError:
        yield d
    else:
        pytest.skip("no unwritable directory on this machine")


def test_device_without_cuda_is_one_line(capsys):
    device = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for command in (["generate", "--preset", "tiny"], ["bench", "--preset", "tiny"]):
        err = one_line_error(capsys, *command, "--device", device)
        assert re.search(rf"--device {device}: (CUDA is not available|this machine has)", err)


def test_output_errors_name_the_argument_and_path(tmp_path, capsys, unwritable_dir):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    before = sorted(tmp_path.rglob("*"))
    cases = [
        (["generate", "--out", tmp_path / "a-dir"], rf"--out {tmp_path}/a-dir: is a directory"),
        (["generate", "--out", tmp_path / "a-file" / "t.npy"],
         rf"--out {tmp_path}/a-file/t.npy: {tmp_path}/a-file is a file, not a directory"),
        (["generate", "--out", unwritable_dir / "t.npy"],
         rf"--out {unwritable_dir}/t.npy: cannot write in {unwritable_dir} \("),
        (["generate", "--out", unwritable_dir / "new" / "t.npy"],
         rf"--out {unwritable_dir}/new/t.npy: cannot write in {unwritable_dir} \("),
        (["bench", "--history", tmp_path / "a-dir"], rf"--history {tmp_path}/a-dir: is a directory"),
        (["bench", "--history", tmp_path / "a-file" / "h.jsonl"], r"--history .*a-file is a file"),
        (["bench", "--history", unwritable_dir / "h.jsonl"], rf"--history .*: cannot write in {unwritable_dir}"),
        (["demo", "--out", tmp_path / "a-file"], rf"--out {tmp_path}/a-file: {tmp_path}/a-file is a file"),
        (["demo", "--out", unwritable_dir / "demo"], rf"--out {unwritable_dir}/demo: cannot write in"),
        (["demo", "--out", tmp_path / "d", "--assets", tmp_path / "no-assets"],
         rf"--assets {tmp_path}/no-assets: not a directory"),
    ]
    for argv, match in cases:
        if argv[0] in ("generate", "bench"):
            argv = argv[:1] + ["--preset", "tiny"] + argv[1:]
        err = one_line_error(capsys, *argv)
        assert re.search(match, err), (argv, err)
    assert sorted(tmp_path.rglob("*")) == before     # nothing written, nothing left behind


def test_save_npy_leaves_no_temporary_file(tmp_path):
    from soundstorm.cli import _save_npy

    target = tmp_path / "out.npy"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        _save_npy(target, np.zeros(3))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep", "out.npy"]


def test_a_failed_write_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    def no_space(file, array):
        file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", no_space)
    err = one_line_error(capsys, "generate", "--preset", "tiny", "--seconds", 0.2, "--quiet",
                         "--out", tmp_path / "t.npy")
    assert f"--out {tmp_path}/t.npy: cannot write it (No space left on device)" in err
    assert list(tmp_path.iterdir()) == []


def test_os_errors_from_inputs_name_their_argument(tmp_path, capsys, monkeypatch):
    import soundstorm.cli as cli

    model = tmp_path / "model"

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(model / "model.safetensors"))

    monkeypatch.setattr(cli, "Engine", unreadable)
    err = one_line_error(capsys, "generate", "--model", model)
    assert f"--model {model}: Permission denied ({model}/model.safetensors)" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_inputs_are_one_line(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.arange(5))
    (tmp_path / "s.npy").chmod(0)
    (tmp_path / "b.jsonl").write_text('{"semantic": "s.npy"}\n')
    (tmp_path / "b.jsonl").chmod(0)
    err = one_line_error(capsys, "generate", "--preset", "tiny", "--semantic", tmp_path / "s.npy")
    assert f"--semantic: {tmp_path}/s.npy is not a readable .npy array" in err
    err = one_line_error(capsys, "generate", "--preset", "tiny", "--manifest", tmp_path / "b.jsonl")
    assert f"--manifest {tmp_path}/b.jsonl: cannot read it (Permission denied)" in err


def test_defaults_fit_the_preset(tmp_path, capsys):
    """The tiny preset holds 5.12 s: the default length is that, not 10 s."""
    code, out, _ = run_cli(capsys, "generate", "--preset", "tiny", "--quiet", "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["frames"] == 256
    code, out, _ = run_cli(capsys, "bench", "--preset", "tiny", "--repeats", 1, "--quiet", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["seconds"] == 5.12 and result["frames"] == 256


def test_speed_is_worded_the_right_way_round():
    from soundstorm.engine.benchmark import real_time_text

    assert real_time_text(1.107) == \
        "1.11 s per second of audio, 0.90x real time (slower than real time)"
    assert real_time_text(0.31) == "0.31 s per second of audio, 3.23x faster than real time"
    assert real_time_text(0.002) == "0.002 s per second of audio, 500x faster than real time"
    assert real_time_text(1.0).endswith("exactly real time")


@pytest.mark.parametrize("rtf,words", [
    (1.107, "real-time factor  1.11 s per second of audio, 0.90x real time (slower than real time)"),
    (0.31, "real-time factor  0.31 s per second of audio, 3.23x faster than real time"),
])
def test_bench_words_its_speed_the_right_way_round(capsys, monkeypatch, rtf, words):
    from soundstorm.engine import benchmark

    def fake_run(preset, seconds, batch, *args, **kwargs):
        return {"preset": preset, "seconds": seconds, "frames": 50, "batch": batch,
                "dtype": "float32", "backend": "torch", "device": "cpu", "threads": 1,
                "repeats": 1, "wall_s": rtf, "wall_s_min": rtf, "wall_s_max": rtf,
                "real_time_factor": rtf, "frames_per_s": 50 / rtf, "forward_passes": 19,
                "gflop_per_pass": 0.1, "achieved_gflops": 1.0, "matmul_gflops": 2.0,
                "fraction_of_matmul": 0.5, "fraction_min": 0.5, "fraction_max": 0.5}

    monkeypatch.setattr(benchmark, "run_preset", fake_run)
    code, out, _ = run_cli(capsys, "bench", "--preset", "tiny", "--seconds", 1, "--quiet")
    assert code == 0 and words in out, out


def test_generate_and_bench_take_quantize(capsys):
    from soundstorm.cli import build_parser

    for argv in (["generate", "--preset", "tiny"], ["bench"], ["demo"]):
        assert build_parser().parse_args(argv + ["--quantize", "INT8"]).quantize == "int8"
        assert build_parser().parse_args(argv).quantize == "none"
    code, out, _ = run_cli(capsys, "generate", "--preset", "tiny", "--seconds", 0.4,
                           "--backend", "torch", "--quantize", "int8", "--json", "--quiet")
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary["quantize"] == "int8" and summary["backend"] == "torch"
    code, out, _ = run_cli(capsys, "generate", "--preset", "tiny", "--seconds", 0.4,
                           "--json", "--quiet")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["quantize"] is None
    code, out, _ = run_cli(capsys, "bench", "--preset", "tiny", "--seconds", 0.4,
                           "--repeats", 1, "--quantize", "int8", "--json", "--quiet")
    r = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and r["quantize"] == "int8" and r["fraction_of_int8_matmul"] > 0
    assert "with int8 linear layers" in out and "of the int8 roofline" in out


@pytest.mark.parametrize("flag", ["--quiet", "--no-progress"])
def test_every_command_takes_quiet_and_no_progress(tmp_path, capsys, flag):
    from soundstorm.cli import build_parser

    parser = build_parser()
    for argv in (["generate", "--preset", "tiny"], ["bench"], ["demo"], ["info", "tiny"]):
        assert parser.parse_args(argv + [flag]).quiet is True
        assert parser.parse_args(argv).quiet is False
    code, _, err = run_cli(capsys, "generate", "--preset", "tiny", "--seconds", 0.2, flag)
    assert code == 0 and "decoding" not in err


def test_a_manifest_that_is_not_utf8_names_the_line(tmp_path, capsys):
    np.save(tmp_path / "s.npy", np.arange(5))
    (tmp_path / "batch.jsonl").write_bytes(b'{"semantic": "s.npy"}\n{"semantic": "\xe9.npy"}\n')
    err = one_line_error(capsys, "generate", "--preset", "tiny", "--manifest",
                         tmp_path / "batch.jsonl")
    assert f"{tmp_path}/batch.jsonl:2: not UTF-8 text (byte 0xe9 at column 15)" in err


def manifest(tmp_path, *outs) -> Path:
    """A manifest of one line per entry of `outs` (None: no "out")."""
    np.save(tmp_path / "s.npy", np.arange(5))
    lines = [json.dumps({"semantic": "s.npy", **({} if o is None else {"out": str(o)})})
             for o in outs]
    (tmp_path / "batch.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "batch.jsonl"


def test_manifest_outputs_are_checked_before_decoding(tmp_path, capsys, unwritable_dir):
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("x")
    b = tmp_path / "batch.jsonl"
    cases = [
        (("o/a.npy", "o/b.npy", "o/./a.npy"),
         rf"manifest lines {b}:1, {b}:3 all write {tmp_path}/o/a.npy; give each line its own"),
        (("o/a.npy", "a-dir"), rf'{b}:2: "out" {tmp_path}/a-dir: is a directory'),
        (("o/a.npy", "a-file/b.npy"), rf'{b}:2: "out" {tmp_path}/a-file/b.npy: {tmp_path}/a-file is a file'),
        (("o/a.npy", "o/b.npy", unwritable_dir / "c.npy"), rf'{b}:3: "out" {unwritable_dir}/c.npy: cannot write in'),
        # without "out", line 2 goes to the manifest's folder as 00001.npy
        (("00001.npy", None), rf"manifest lines {b}:1, {b}:2 all write {tmp_path}/00001.npy"),
    ]
    for outs, match in cases:
        manifest(tmp_path, *outs)
        before = sorted(tmp_path.rglob("*"))
        err = one_line_error(capsys, "generate", "--preset", "tiny", "--quiet", "--manifest", b)
        assert re.search(match, err), (outs, err)
        assert sorted(tmp_path.rglob("*")) == before, outs   # nothing decoded or written
    manifest(tmp_path, None)
    err = one_line_error(capsys, "generate", "--preset", "tiny", "--manifest", b,
                         "--out", tmp_path / "a-file")
    assert f"--out {tmp_path}/a-file: {tmp_path}/a-file is a file, not a directory" in err
    code, _, _ = run_cli(capsys, "generate", "--preset", "tiny", "--quiet", "--manifest", b,
                         "--out", tmp_path / "new")
    assert code == 0 and np.load(tmp_path / "new" / "00000.npy").shape == (10, 4)


def test_demo_files_leave_no_temporary_file(tmp_path):
    from soundstorm.demo.run import _write_wav

    (tmp_path / "generated.wav").mkdir()
    with pytest.raises(OSError):
        _write_wav(tmp_path / "generated.wav", np.zeros(160, np.float32), 16000)
    assert [p.name for p in tmp_path.iterdir()] == ["generated.wav"]
    _write_wav(tmp_path / "ok.wav", np.zeros(160, np.float32), 16000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generated.wav", "ok.wav"]


def test_deeply_nested_json_in_a_model_or_demo_assets_is_one_line(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("[" * 100_000)
    err = one_line_error(capsys, "generate", "--model", tmp_path / "model", "--seconds", 1)
    assert f"{tmp_path}/model/config.json is not a soundstorm model config: its JSON is " \
           f"nested too deeply" in err
    assets = tmp_path / "assets"
    for part in ("model", "codec", "semantic"):
        (assets / part).mkdir(parents=True)
    (assets / "demo.json").write_text("{\"a\": " * 100_000)
    from soundstorm.demo.run import load_assets
    with pytest.raises(ValueError, match="demo.json is not valid demo settings JSON .nested too deeply"):
        load_assets(assets)


def test_the_engine_imports_neither_the_command_line_nor_training_nor_the_demo():
    code = ("import sys, soundstorm.engine, soundstorm.engine.engine, soundstorm.engine.runner;"
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in "
            "(['soundstorm', 'cli'], ['soundstorm', 'training'], ['soundstorm', 'demo'])))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
