"""The whole model and decoder on the Triton backend: the `tiny` preset gives the torch
backend's logits within tolerance and the same decoded tokens; dispatch picks, routes
and refuses as documented."""

import _triton_setup  # noqa: F401  (must come first: picks interpreter or GPU)
from _triton_setup import DEVICE

import copy
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_model, random_codes, random_semantic
from soundstorm.engine import DecodeConfig, Engine, ModelConfig
from soundstorm.kernels import available_backends, get_ops
from soundstorm.kernels.dispatch import _cpp_built

# What "auto" picks on the CPU: the C++ backend when its extension is built, else torch.
CPU_AUTO = "cpp" if _cpp_built() else "torch"


@pytest.fixture(scope="module", params=[0, 8], ids=["paper", "prompt-lookup"])
def engines(request):
    # The lookup with level 1's copy: every level's pass goes through a copy.
    model = make_model(ModelConfig.preset("tiny", prompt_lookup=request.param,
                                          semantic_copy=request.param > 0,
                                          prompt_prior=request.param > 0), seed=3,
                       sharpen=20.0)
    if model.prior is not None:
        with torch.no_grad():
            model.prior.weight.fill_(0.5)
    return (Engine(copy.deepcopy(model), device=DEVICE, backend="torch"),
            Engine(copy.deepcopy(model), device=DEVICE, backend="triton"))


def test_engine_routes_every_op_to_the_kernels(engines):
    ref, tri = engines
    assert tri.backend == "triton" and tri.model.ops is get_ops("triton", DEVICE)
    assert ref.backend == "torch"


@pytest.mark.parametrize("level", [1, 3, None])
def test_logits_match_the_torch_backend(engines, level):
    ref, tri = engines
    cfg = ref.config
    B, T = 3, 29
    semantic = random_semantic(cfg, B, (T + 1) // 2, seed=1).to(DEVICE)
    tokens = random_codes(cfg, B, T, cfg.num_quantizers, seed=2)
    tokens[:, 10:, 1:] = cfg.mask_id          # a decoding state: finer levels masked
    tokens = tokens.to(DEVICE)
    lengths = torch.tensor([T, 17, 1], device=DEVICE)
    with torch.no_grad():
        a = ref.model(semantic, tokens, lengths, level=level)
        b = tri.model(semantic, tokens, lengths, level=level)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_are_as_close_as_torch_in_that_dtype(dtype):
    """In half precision the Triton model may be at most twice as far from the float32
    model as PyTorch is in the same dtype (plus a small margin)."""
    model = make_model(ModelConfig.preset("tiny"), seed=3, sharpen=20.0)
    ref32 = Engine(copy.deepcopy(model), device=DEVICE, backend="torch")
    ref_low = Engine(copy.deepcopy(model), device=DEVICE, dtype=dtype, backend="torch")
    tri = Engine(copy.deepcopy(model), device=DEVICE, dtype=dtype, backend="triton")
    cfg = ref32.config
    semantic = random_semantic(cfg, 2, 10, seed=6).to(DEVICE)
    tokens = random_codes(cfg, 2, 20, cfg.num_quantizers, seed=7).to(DEVICE)
    lengths = torch.tensor([20, 13], device=DEVICE)
    with torch.no_grad():
        want = ref32.model(semantic, tokens, lengths, level=2)
        err_torch = (ref_low.model(semantic, tokens, lengths, level=2).float() - want).abs().max()
        err_triton = (tri.model(semantic, tokens, lengths, level=2).float() - want).abs().max()
    assert err_triton <= 2 * err_torch + 1e-2, (err_triton, err_torch)


@pytest.mark.parametrize("decode", [
    DecodeConfig(steps_per_level=(4, 1, 1, 1), temperature=0.0, gumbel_scale=0.0),
    DecodeConfig(steps_per_level=(3, 2, 1, 1)),   # sampled, with annealed Gumbel noise
], ids=["greedy", "sampled"])
def test_decoded_tokens_match_the_torch_backend(engines, decode):
    ref, tri = engines
    cfg = ref.config
    semantic = random_semantic(cfg, 2, 13, seed=4)
    prompt = random_codes(cfg, 2, 5, cfg.num_quantizers, seed=5)
    kwargs = dict(semantic_lengths=torch.tensor([13, 9]), prompt=prompt,
                  prompt_lengths=torch.tensor([5, 3]), decode=decode, seed=[21, 22])
    a = ref.generate(semantic, **kwargs)
    b = tri.generate(semantic, **kwargs)
    assert torch.equal(a, b)
    b = b.cpu()   # on the engine's device (CUDA on a GPU machine); the prompt is on the CPU
    assert torch.equal(b[0, :5], prompt[0]) and (b[1, 18:] == -1).all()


def test_triton_refuses_float64_and_auto_then_picks_another_backend():
    with pytest.raises(ValueError, match="backend 'triton' runs float32, float16 and "
                                         "bfloat16 models, got dtype torch.float64"):
        Engine.from_preset("tiny", device=DEVICE, dtype="float64", backend="triton")
    want = CPU_AUTO if torch.device(DEVICE).type == "cpu" else "torch"
    assert Engine.from_preset("tiny", device=DEVICE, dtype="float64").backend == want


def test_auto_prefers_triton_only_on_cuda():
    assert available_backends(torch.device("cpu"))[0] == CPU_AUTO
    # On CPU tensors Triton runs only in its interpreter (on where no GPU is, see _triton_setup)
    assert ("triton" in available_backends(torch.device("cpu"))) == (DEVICE.type == "cpu")
    assert get_ops("auto", torch.device("cpu")).name == CPU_AUTO
    if torch.cuda.is_available():
        assert get_ops("auto", torch.device("cuda")).name == "triton"


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: triton can run")
def test_triton_without_a_gpu_or_the_interpreter_raises_a_clear_error():
    r = _run("from soundstorm.engine import Engine\n"
             "try:\n"
             "    Engine.from_preset('tiny', backend='triton')\n"
             "except RuntimeError as e:\n"
             "    print('ERR', e)\n"
             "from soundstorm.kernels import get_ops\n"
             "print('AUTO', get_ops('auto').name)\n")
    assert r.returncode == 0, r.stderr
    assert "ERR backend 'triton' runs on CUDA tensors, got a tensor on cpu" in r.stdout
    assert "TRITON_INTERPRET=1" in r.stdout and f"AUTO {CPU_AUTO}" in r.stdout
