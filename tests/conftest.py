"""Shared fixtures: tiny models of every family (built from configs) and an offline hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("PIP_NO_INDEX", "1")  # TransformerLens pip-installs torchvision when it boots an image-text bridge without it, which can swap the CPU torch for a CUDA build

from featsteer.testing import FAMILY_NAMES, tiny_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(params=FAMILY_NAMES)
def family_model(request):
    """`(family, hf_model, tokenizer)` for every supported family."""
    model, tokenizer = tiny_model(request.param)
    return request.param, model, tokenizer


@pytest.fixture
def llama_adapter():
    """A tiny Llama behind the featsteer adapter."""
    from featsteer.models import load_model

    model, tokenizer = tiny_model("llama")
    return load_model(model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module: tiny models gain nothing from threads, and on a busy 2-core machine
    they thrash. Restored afterwards. Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """The real prompt sets next to the project; skips when they are not there (a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real prompt sets not found at {SHARED_DATA}")
    return SHARED_DATA


def count_hooks(module) -> int:
    """Total PyTorch hooks registered anywhere in a module tree."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(getattr(m, "_forward_hooks_with_kwargs", {}))
        for m in module.modules()
    )


def record_tokenizer_calls(model, monkeypatch) -> list[str]:
    """The texts `model`'s tokenizer is called on from now on (the list fills as it is called), for tests that a prompt is
    tokenized once. The adapter's once-per-tokenizer probe (`_appended_special_tokens`) is made before recording starts."""
    model._appended_special_tokens()
    tokenizer_class, tokenizer_call, calls = type(model.tokenizer), type(model.tokenizer).__call__, []

    def counting(self, *args, **kwargs):
        if self is model.tokenizer:
            calls.append(args[0] if args else kwargs.get("text"))
        return tokenizer_call(self, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "__call__", counting)
    return calls
