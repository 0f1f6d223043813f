"""NAME against aic's contract for adapter plugins."""

from aic_core.testing import AdapterContract, check_entry_point
from aic_NAME.plugin import NameAdapter


class TestNameAdapter(AdapterContract):
    plugin = NameAdapter


def test_the_plugin_is_installed_under_the_aic_entry_points():
    check_entry_point(NameAdapter)
