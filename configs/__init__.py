"""The configurations, one module per setting, each with `get_config()`.

The command line loads one by path (`--config=configs/cifar.py`, run from the repository's root); code and tests
import them (`from configs import tiny`) with the repository's root on the path, as pytest.ini sets for the tests.
"""
