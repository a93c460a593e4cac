"""Every Serve deployment class sees, in its replica, every module-level name its methods use.

Serve pickles a deployment's class by value when the decorator runs (at import), so a helper the
class calls but the module defines *below* the class is missing in the replica: a NameError at
replica start, which only a test that starts that code path would show. This check unpickles each
deployment the way a replica does and looks for the names, without starting Ray.
"""

from __future__ import annotations

import dis
import importlib
import inspect
import types

import pytest

MODULES = ["services.rollout.app", "services.tools.host", "services.tools.app", "services.judge.app"]


def _code_names(code: types.CodeType) -> set[str]:
    """The global names a function's code (nested functions included) loads."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _missing(module: types.ModuleType, deployment) -> list[str]:
    from ray import cloudpickle  # why: only the check needs Ray's pickler

    cls = cloudpickle.loads(deployment._replica_config.serialized_deployment_def)
    missing = []
    for klass in cls.__mro__:
        for attr, fn in vars(klass).items():
            fn = getattr(fn, "__func__", fn)
            if not isinstance(fn, types.FunctionType) or fn.__module__ != module.__name__:
                continue
            for name in sorted(_code_names(fn.__code__)):
                if hasattr(module, name) and name not in fn.__globals__:
                    missing.append(f"{klass.__name__}.{attr} uses {name}")
    return missing


def test_the_check_finds_a_helper_defined_below_its_deployment(tmp_path, monkeypatch):
    (tmp_path / "late_helper_mod.py").write_text(
        "from ray import serve\n\n@serve.deployment\nclass D:\n    def __init__(self):\n"
        "        self.x = helper()\n\ndef helper():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module("late_helper_mod")
    assert _missing(mod, mod.D) == ["D.__init__ uses helper"]


@pytest.mark.parametrize("name", MODULES)
def test_deployments_carry_the_module_names_they_use(name):
    from ray.serve.deployment import Deployment  # why: the deployments are found by type

    module = importlib.import_module(name)
    deployments = [v for _, v in inspect.getmembers(module) if isinstance(v, Deployment)]
    assert deployments, f"{name} defines no deployment: update MODULES"
    problems = [p for d in deployments for p in _missing(module, d)]
    assert not problems, f"{name}: defined below the deployment class, so absent in its replica: {problems}"
