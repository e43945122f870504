"""Plugin discovery: built-ins, entry points, broken plugins, the disable list and autoload switch."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pluggy
import pytest
import torch

import rwkv_zoo
from rwkv_zoo import hookspecs, pluginmanager

ROOT = Path(__file__).resolve().parents[2]
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("rwkv_zoo_")]


def test_seven_hooks_each_documented():
    assert sorted(HOOKS) == sorted(
        [
            "rwkv_zoo_register_versions",
            "rwkv_zoo_register_backends",
            "rwkv_zoo_register_ops",
            "rwkv_zoo_select_backend",
            "rwkv_zoo_register_formats",
            "rwkv_zoo_model_built",
            "rwkv_zoo_update_env_info",
        ]
    )
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and len(doc) > 40, f"{name} needs a docstring"


def test_hooks_are_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [h for h in HOOKS if h not in readme]
    assert not missing, f"README.md does not document {missing}"


def test_builtins_register_through_their_own_hooks():
    plugins = {p["name"]: p for p in rwkv_zoo.list_plugins()}
    for name in pluginmanager.DEFAULT_PLUGINS:
        assert plugins[name]["error"] is None, plugins[name]
        assert plugins[name]["source"] == "builtin"
    assert "rwkv_zoo_register_versions" in plugins["rwkv_zoo.versions.v6"]["hooks"]
    assert "rwkv_zoo_register_backends" in plugins["rwkv_zoo.backends.reference"]["hooks"]
    assert rwkv_zoo.list_versions() == ["attn", "hybrid", "v4", "v5", "v6", "v7", "v7a", "v8"]


def test_misspelled_hook_fails_loudly():
    class Typo:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backend(self, register):  # missing "s"
            pass

    with pytest.raises(pluggy.PluginValidationError):
        rwkv_zoo.register_plugin(Typo(), name="typo")
    pluginmanager.unregister_plugin("typo")


def test_a_plugin_whose_hook_raises_is_reported_and_the_rest_works():
    class Exploding:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_backends(self, register):
            raise RuntimeError("driver exploded")

    model = rwkv_zoo.randomize_(rwkv_zoo.build("v5-tiny"), seed=0).eval()
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        want, _ = model(tokens)
    with rwkv_zoo.plugin(Exploding(), name="exploding"):
        with torch.no_grad():
            got, _ = model(tokens)  # the first dispatch after the plugin arrived runs its failing hook
        assert torch.equal(got, want)
        names = [b["name"] for b in rwkv_zoo.list_backends()]
        assert "reference" in names
        rec = {p["name"]: p for p in rwkv_zoo.list_plugins()}["exploding"]
        assert "RuntimeError: driver exploded" in rec["error"]
        assert rwkv_zoo.build("v5-tiny").config.n_layer == model.config.n_layer


def test_model_built_hook_sees_every_build():
    seen = []

    class Watcher:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_model_built(self, model, spec):
            seen.append((spec.version, spec.size, type(model).__name__))

    with rwkv_zoo.plugin(Watcher(), name="watcher"):
        rwkv_zoo.build("v7-1.5B", device="meta")
    assert seen == [("v7", "1.5B", "RWKV")]


def test_versions_can_come_from_a_plugin():
    from rwkv_zoo.registry import SizePreset, VersionSpec, get_version

    base = get_version("v5")

    class Plugin:
        @rwkv_zoo.hookimpl
        def rwkv_zoo_register_versions(self, register):
            register(VersionSpec("v5-alt", "alt", base.config_cls, base.model_factory,
                                 (SizePreset("tiny", 1, 64, 64, options=(("head_size", 16),)),), base.param_groups))

    with rwkv_zoo.plugin(Plugin(), name="alt"):
        assert "v5-alt-tiny" in rwkv_zoo.list_models()
        assert rwkv_zoo.build("v5-alt", size="tiny").config.n_layer == 1
    assert "v5-alt-tiny" not in rwkv_zoo.list_models()


# --- entry points, in a subprocess with a fake installed distribution ------------------------------

PROBE = textwrap.dedent(
    """
    import json, rwkv_zoo
    plugins = {p["name"]: p for p in rwkv_zoo.list_plugins()}
    out = {
        "plugins": {n: {k: p[k] for k in ("error", "disabled", "source")} for n, p in plugins.items()},
        "backends": [b["name"] for b in rwkv_zoo.list_backends()],
        "built": type(rwkv_zoo.build("v6-tiny")).__name__,
    }
    print(json.dumps(out))
    """
)


@pytest.fixture
def fake_dist(tmp_path):
    (tmp_path / "broken_plugin.py").write_text("raise ImportError('needs libfoo.so, which is missing')\n")
    (tmp_path / "good_plugin.py").write_text(
        textwrap.dedent(
            """
            import rwkv_zoo
            from rwkv_zoo.backends.reference import make_backend

            @rwkv_zoo.hookimpl
            def rwkv_zoo_register_backends(register):
                b = make_backend()
                b.name = "goodbackend"
                register(b)
            """
        )
    )
    info = tmp_path / "rwkv_zoo_fake-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rwkv-zoo-fake\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rwkv_zoo]\nbroken = broken_plugin\ngood = good_plugin\n")
    return tmp_path


def _probe(path, **env):
    full = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    full.pop("RWKV_ZOO_NO_AUTOLOAD", None)
    full.update(env)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.integration
def test_entry_point_plugins_load_and_a_broken_one_is_reported(fake_dist):
    out = _probe(fake_dist)
    assert "needs libfoo.so" in out["plugins"]["broken"]["error"]
    assert out["plugins"]["good"]["error"] is None
    assert out["plugins"]["good"]["source"] == "entrypoint"
    assert "goodbackend" in out["backends"]
    assert out["built"] == "RWKV"


@pytest.mark.integration
def test_disable_list_and_autoload_switch(fake_dist):
    out = _probe(fake_dist, RWKV_ZOO_DISABLE_PLUGINS="good,broken")
    assert out["plugins"]["good"]["disabled"] and "goodbackend" not in out["backends"]
    out = _probe(fake_dist, RWKV_ZOO_NO_AUTOLOAD="1")
    assert "good" not in out["plugins"] and "broken" not in out["plugins"]
    out = _probe(fake_dist, RWKV_ZOO_DISABLE_PLUGINS="rwkv_zoo.backends.reference")
    assert out["plugins"]["rwkv_zoo.backends.reference"]["disabled"]
    assert "reference" not in out["backends"] and "goodbackend" in out["backends"]
