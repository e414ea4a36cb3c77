"""pytest-benchmark settings for the RTF suite.

    pytest bench/ --benchmark-json=rtf.json            # default cases: finishes in minutes
    pytest bench/ --run-slow --benchmark-json=rtf.json # every case, incl. paper preset at 30 s
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the cases marked slow (large presets, long audio, "
                          "low-precision dtypes on CPU)")
    parser.addoption("--rounds", type=int, default=3, help="timed rounds per case (default 3)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes long on a CPU; run with --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow on this device: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
