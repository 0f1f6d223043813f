"""NAME against aic's contract for model plugins."""

from aic_core.testing import ModelContract, check_entry_point
from aic_NAME.plugin import NameModel


class TestNameModel(ModelContract):
    plugin = NameModel
    options = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16}


def test_the_plugin_is_installed_under_the_aic_entry_points():
    check_entry_point(NameModel)
