"""NAME against aic's contract for trainer plugins."""

from aic_core.testing import TrainerContract, check_entry_point
from aic_NAME.plugin import NameTrainer


class TestNameTrainer(TrainerContract):
    plugin = NameTrainer


def test_the_plugin_is_installed_under_the_aic_entry_points():
    check_entry_point(NameTrainer)
