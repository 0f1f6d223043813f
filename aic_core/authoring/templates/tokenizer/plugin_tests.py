"""NAME against aic's contract for tokenizer plugins."""

from aic_core.testing import TokenizerContract, check_entry_point
from aic_NAME.plugin import NameTokenizerPlugin


class TestNameTokenizer(TokenizerContract):
    plugin = NameTokenizerPlugin


def test_the_plugin_is_installed_under_the_aic_entry_points():
    check_entry_point(NameTokenizerPlugin)
