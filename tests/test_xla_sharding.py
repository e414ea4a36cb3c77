"""Data parallelism over a device mesh: rows split across (forced) host devices decode to
the same tokens as on one device, with the `jnp` ops and with the Pallas kernels. Runs in
a subprocess: the device count must be set in XLA_FLAGS before JAX is first imported."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")

SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import jax
from conftest import make_model, random_codes, random_semantic
from soundstorm.engine import DecodeConfig, Engine, ModelConfig
from soundstorm.engine.xla import XlaEngine

cfg = ModelConfig.preset("tiny")
model = make_model(cfg, seed=0, sharpen=20.0)
semantic = random_semantic(cfg, 5, 17, seed=1)
kw = dict(semantic_lengths=torch.tensor([17, 4, 9, 1, 12]),
          prompt=random_codes(cfg, 5, 3, cfg.num_quantizers, seed=2),
          prompt_lengths=torch.tensor([3, 0, 2, 1, 3]),
          decode=DecodeConfig(steps_per_level=(4, 2, 1, 1)), seed=[1, 2, 3, 4, 5])
one = XlaEngine(model, devices=1)
four = XlaEngine(model, devices=4)
_, arrays, _ = four.inputs(semantic, **kw)
shards = [tuple(s.data.shape) for s in arrays[1].addressable_shards]
a, b = one.generate(semantic, **kw), four.generate(semantic, **kw)
torch_tokens = Engine(model, backend="torch").generate(semantic, **kw)
# the Pallas kernels (interpreted here) run on each device's own rows
computed = XlaEngine(model, devices=1, exact_noise=False).generate(semantic, **kw)
pallas = XlaEngine(model, devices=4, kernels="pallas").generate(semantic, **kw)
print(json.dumps({"devices": len(jax.devices()), "shards": shards,
                  "equal": bool(torch.equal(a, b)),
                  "torch_equal": bool(torch.equal(b, torch_tokens)),
                  "pallas_equal": bool(torch.equal(pallas, computed))}))
"""


def test_rows_split_over_four_devices_decode_as_on_one():
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tests)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    # 5 rows padded to 8, two per device
    assert len(result["shards"]) == 4 and all(s[0] == 2 for s in result["shards"])
    assert result["equal"] and result["torch_equal"] and result["pallas_equal"]
