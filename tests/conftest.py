import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen
# before triton is first imported by anything in this process (tests/_triton_setup.py).
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from soundstorm.engine import Engine, ModelConfig, SoundStorm


@pytest.fixture
def one_thread():
    """Run the test with torch on one thread (bitwise-reproducible training)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return ModelConfig.preset("tiny")


def make_model(config: ModelConfig, seed: int = 0, sharpen: float = 1.0) -> SoundStorm:
    """A randomly initialised model; `sharpen` scales the heads so the output distributions
    are far from uniform (as a trained model's are)."""
    torch.manual_seed(seed)
    model = SoundStorm(config).eval()
    with torch.no_grad():
        model.head_weight.mul_(sharpen)
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_config) -> SoundStorm:
    return make_model(tiny_config, seed=0, sharpen=20.0)


@pytest.fixture(scope="session")
def engine64(tiny_model) -> Engine:
    """float64 engine: exactness tests compare decodes without float-rounding ties."""
    import copy
    return Engine(copy.deepcopy(tiny_model), dtype=torch.float64, backend="torch")


def check_round_trip_and_older_config(model: SoundStorm, plain: SoundStorm, tmp_path,
                                      field: str, on, missing: str) -> None:
    """`model`'s config and weights survive save and load; `plain` (the same model without
    the optional part `field` turns on) saved with `field` left out of its config loads
    with the field's default (off), and with `field` set to `on` its load names the
    missing tensor (`missing`, a regex)."""
    import json

    model.save_pretrained(tmp_path / "m")
    back = SoundStorm.from_pretrained(tmp_path / "m")
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    plain.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    data = json.loads(path.read_text())
    del data["model"][field]
    path.write_text(json.dumps(data))
    assert getattr(SoundStorm.from_pretrained(tmp_path / "old").config, field) == \
        getattr(ModelConfig(), field)
    data["model"][field] = on
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=missing):
        SoundStorm.from_pretrained(tmp_path / "old")


def train_on_task(config: ModelConfig, task, level: int, steps: int, seed: int = 0):
    """A fresh model trained with Adam on `task(config, batch, frames, generator)` ->
    (semantic, inputs, targets after the first half), the loss on `level` after the first
    half; then the task's held-out draw (64 rows, seed 99) and the model's argmax there:
    (model, semantic, inputs, targets, predictions)."""
    import torch.nn.functional as F

    torch.manual_seed(seed)
    model = SoundStorm(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        semantic, inputs, target = task(config, 16, 48, g)
        logits = model(semantic, inputs, level=level)[:, 24:]
        loss = F.cross_entropy(logits.reshape(-1, config.codebook_size), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    semantic, inputs, target = task(config, 64, 48, torch.Generator().manual_seed(99))
    with torch.no_grad():
        pred = model(semantic, inputs, level=level)[:, 24:].argmax(-1)
    return model, semantic, inputs, target, pred


def random_semantic(config: ModelConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.semantic_vocab_size, (batch, length), generator=g)


def random_codes(config: ModelConfig, *shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.codebook_size, shape, generator=g)
