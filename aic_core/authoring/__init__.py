"""The plugin author's kit: the contract tests of each kind (`testing`) and `aic new-plugin` (`scaffold`)."""
