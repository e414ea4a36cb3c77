"""Setuptools entry point. Metadata lives in pyproject.toml; this file exists so that the
C++ extension (csrc/ -> soundstorm._C) can be declared here when it lands."""

from setuptools import setup

setup()
