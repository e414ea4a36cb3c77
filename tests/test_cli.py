import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from soundstorm.engine import Engine
from soundstorm.engine.cli import main

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
    (["generate", "--preset", "tiny", "--seconds", "-1"], "--seconds must be > 0"),
    (["generate", "--preset", "tiny", "--temperature", "-1"], "temperature must be >= 0"),
    (["info", "neither"], "'neither' is neither a model directory"),
])
def test_errors_are_one_line_with_exit_status_2(capsys, argv, match):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
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
    exe = [sys.executable, "-m", "soundstorm.engine.cli"]
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
    assert re.search(match, capsys.readouterr().err)
