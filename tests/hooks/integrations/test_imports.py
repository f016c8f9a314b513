"""Adapters import their framework lazily and name the extra to install when it is missing."""

import importlib
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module,blocked,extra", [
    ("hooks.integrations.hf_trainer", ["transformers"], "hf"),
    ("hooks.integrations.lightning", ["lightning", "lightning.pytorch", "pytorch_lightning"], "lightning"),
])
def test_missing_framework_names_the_extra(monkeypatch, module, blocked, extra):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)     # "import name" raises ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'midtrain\[{extra}\]'"):
        importlib.import_module(module)
    sys.modules.pop(module, None)


def test_import_hooks_pulls_in_no_framework():
    code = ("import sys, hooks, hooks.integrations; "
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
