"""On CUDA only (skipped elsewhere; `make gpu-check` runs them): the step is capture-safe on
real CUDA tensors, CUDA-graph decoding equals eager decoding token for token, warm-up
captures every graph into one pool, and engines on two GPUs run side by side from threads.
"""

import _triton_setup  # noqa: F401  (must come first: picks interpreter or GPU)

import copy
import threading

import pytest
import torch

from conftest import make_model, random_codes, random_semantic
from soundstorm.engine import DecodeConfig, Engine, ModelConfig
from soundstorm.engine.capture import check_step_modes
from soundstorm.engine.runner import ALL_MODES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BACKENDS = ["torch", "triton"]
GREEDY = DecodeConfig(steps_per_level=(6, 2, 1, 1), temperature=0.0)
SAMPLED = DecodeConfig(steps_per_level=(6, 2, 1, 1))


@pytest.fixture(scope="module")
def model():
    return make_model(ModelConfig.preset("tiny"), seed=21, sharpen=20.0)


def batch(cfg, seed=0):
    semantic = random_semantic(cfg, 4, 70, seed=seed).cuda()
    prompt = random_codes(cfg, 4, 30, cfg.num_quantizers, seed=seed + 1).cuda()
    return dict(semantic=semantic, semantic_lengths=[70, 9, 41, 1], prompt=prompt,
                prompt_lengths=[30, 0, 12, 2], seed=[11, 12, 13, 14])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_mode_is_capture_safe_on_cuda_tensors(model, backend, dtype):
    engine = Engine(copy.deepcopy(model), device="cuda", dtype=dtype, backend=backend)
    for B, T in ((1, 64), (4, 128)):
        checked = check_step_modes(engine.runner, engine.runner.buffers_for(B, T), ALL_MODES)
        assert set(checked) == set(ALL_MODES)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decode", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_graph_decoding_equals_eager_decoding(model, backend, decode):
    graphs = Engine(copy.deepcopy(model), device="cuda", backend=backend)
    eager = Engine(copy.deepcopy(model), device="cuda", backend=backend, cuda_graphs=False)
    assert graphs.runner.use_cuda_graphs and not eager.runner.use_cuda_graphs
    args = batch(graphs.config)
    want = eager.generate(decode=decode, **args)
    first = graphs.generate(decode=decode, **args)       # captures
    captured = graphs.runner.num_graphs
    again = graphs.generate(decode=decode, **args)       # replays only
    assert captured > 0 and graphs.runner.num_graphs == captured
    assert torch.equal(first, want) and torch.equal(again, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scheduled_requests_on_graphs_equal_eager(model, backend):
    graphs = Engine(copy.deepcopy(model), device="cuda", backend=backend, max_batch=4)
    eager = Engine(copy.deepcopy(model), device="cuda", backend=backend, cuda_graphs=False)
    cfg = graphs.config
    requests = []
    for i in range(9):
        S = 5 + 9 * i
        r = dict(semantic=random_semantic(cfg, 1, S, seed=i)[0].cuda(), seed=i,
                 decode=[GREEDY, SAMPLED][i % 2])
        if i % 3:
            r["prompt"] = random_codes(cfg, S, cfg.num_quantizers, seed=i).cuda()
        requests.append(r)
    handles = [graphs.submit(**r) for r in requests]
    for r, h in zip(requests, handles):
        prompt = r.get("prompt")
        want = eager.generate(r["semantic"][None], prompt=None if prompt is None else prompt[None],
                              decode=r["decode"], seed=r["seed"])[0]
        assert torch.equal(h.result(timeout=300), want)
    graphs.scheduler.close()


def test_warmup_captures_every_graph_into_one_pool(model):
    engine = Engine(copy.deepcopy(model), device="cuda", backend="triton", max_batch=4)
    report = engine.warmup(max_frames=128, decodes=[SAMPLED, GREEDY])
    n = engine.runner.num_graphs
    assert report["graphs"] == n == len(report["buckets"]) * len(report["modes"])
    assert report["pool_bytes"] is not None
    args = batch(engine.config)
    args["semantic"] = args["semantic"][:, :60]
    args["prompt"] = args["prompt"][:, :20]
    args["semantic_lengths"] = [60, 9, 41, 1]
    args["prompt_lengths"] = [20, 0, 12, 2]
    out = engine.generate(decode=SAMPLED, **args)
    assert engine.runner.num_graphs == n          # nothing left to capture
    eager = Engine(copy.deepcopy(model), device="cuda", backend="triton", cuda_graphs=False)
    assert torch.equal(out, eager.generate(decode=SAMPLED, **args))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_engines_on_two_gpus_from_two_threads(model, backend):
    engines = [Engine(copy.deepcopy(model), device=f"cuda:{i}", backend=backend) for i in (0, 1)]
    args = batch(engines[0].config)
    torch.cuda.set_device(0)   # the second engine must not depend on the current device
    alone = [e.generate(decode=SAMPLED, **{k: (v.to(e.device) if torch.is_tensor(v) else v)
                                           for k, v in args.items()}) for e in engines]
    assert torch.equal(alone[0].cpu(), alone[1].cpu())
    results, errors = {}, []

    def work(i):
        try:
            e = engines[i]
            local = {k: (v.to(e.device) if torch.is_tensor(v) else v) for k, v in args.items()}
            results[i] = [e.generate(decode=SAMPLED, **local) for _ in range(3)]
        except Exception as error:   # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for i in (0, 1):
        assert all(r.device == engines[i].device and torch.equal(r, alone[i]) for r in results[i])
