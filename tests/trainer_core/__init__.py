"""The trainer_core tests: a package, so that conftest.py imports as
tests.trainer_core.conftest (one module, not a second copy beside pytest's own)."""
