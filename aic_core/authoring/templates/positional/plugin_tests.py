"""NAME against aic's contract for positional plugins."""

from aic_core.testing import PositionalContract, check_entry_point
from aic_NAME.plugin import NamePositional


class TestNamePositional(PositionalContract):
    plugin = NamePositional


def test_the_plugin_is_installed_under_the_aic_entry_points():
    check_entry_point(NamePositional)
