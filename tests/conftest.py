"""Shared fixtures: compiled zoo models are cached per session (compiling is the slow part)."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from anefx import zoo

warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("coremltools").setLevel(logging.ERROR)

_COMPILED: dict[tuple, object] = {}


@pytest.fixture(scope="session")
def compile_zoo():
    """compile_zoo(name, **options) -> (model, args, kwargs, CompiledModel), cached per session."""
    import anefx

    def get(name: str, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in _COMPILED:
            model, args, kwargs = zoo.build(name)
            _COMPILED[key] = (model, args, kwargs, anefx.compile(model, args, kwargs, **options))
        return _COMPILED[key]

    return get


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
