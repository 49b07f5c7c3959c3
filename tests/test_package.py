"""The top-level `featsteer` namespace: lazy re-exports of the everyday entry points."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import featsteer


@pytest.mark.parametrize("name", sorted(featsteer._EXPORTS))
def test_every_top_level_name_is_the_subpackage_object(name):
    assert getattr(featsteer, name) is getattr(importlib.import_module(featsteer._EXPORTS[name]), name)
    assert name in dir(featsteer)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'load_modle'"):
        featsteer.load_modle  # noqa: B018


def test_import_stays_cheap_until_a_name_is_used():
    code = ("import sys, featsteer; before = 'torch' in sys.modules; featsteer.load_model; "
            "print(before, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
