"""The one registry helper: duplicates refused unless replaced on purpose, did-you-mean, entry points."""
import sys

import pytest

from graphopt.backends.registry import BACKENDS
from graphopt.ir.cost import COSTS
from graphopt.ir.opdef import OPS, OpError
from graphopt.ir.registry import Registry, RegistryError
from graphopt.passes.registry import PASSES, PassConfigError


def test_duplicate_refused_naming_the_holder_unless_replaced():
    reg = Registry("widget")
    reg.register("a", 1, owner="pkg_one")
    with pytest.raises(RegistryError, match="widget 'a' is already registered \\(by pkg_one\\).*replace=True"):
        reg.register("a", 2)
    reg.register("a", 3, replace=True)
    assert reg.get("a") == 3


def test_unknown_name_suggests_close_ones():
    reg = Registry("widget")
    reg.register("token_merge", 1, owner="x")
    with pytest.raises(RegistryError, match="unknown widget 'token_merg' \\(did you mean 'token_merge'\\?\\); known: token_merge"):
        reg.get("token_merg")


@pytest.mark.parametrize("registry, error, taken", [(OPS, OpError, "linear"), (PASSES, PassConfigError, "cse"),
                                                    (BACKENDS, ValueError, "torch"), (COSTS, RegistryError, "linear")])
def test_every_project_registry_refuses_duplicates(registry, error, taken):
    before = registry.get(taken)
    with pytest.raises(error, match="already registered"):
        registry.register(taken, object())
    assert registry.get(taken) is before


def test_entry_point_plugins_load_on_first_listing_or_miss(tmp_path, monkeypatch):
    (tmp_path / "widget_plugin.py").write_text("import registry_under_test as r\nr.REG.register('blue', 42)\n")
    (tmp_path / "registry_under_test.py").write_text(
        "from graphopt.ir.registry import Registry\nREG = Registry('widget', group='graphopt_test.widgets')\n")
    dist = tmp_path / "widget_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: widget-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[graphopt_test.widgets]\nblue = widget_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import registry_under_test
    assert "blue" not in registry_under_test.REG._entries   # nothing loaded at import
    assert registry_under_test.REG.get("blue") == 42         # a miss loads the plugins, then finds it
    assert registry_under_test.REG.names() == ["blue"]
    for name in ("registry_under_test", "widget_plugin"):
        sys.modules.pop(name, None)


def test_a_broken_plugin_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_widget.py").write_text("raise RuntimeError('oops')\n")
    dist = tmp_path / "broken_widget-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-widget\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[graphopt_test.broken]\nbroken = broken_widget\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("widget", group="graphopt_test.broken")
    with pytest.raises(RegistryError, match="plugin 'broken'.*broken_widget.*RuntimeError: oops"):
        reg.names()
