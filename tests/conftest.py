"""Markers of this test suite."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compiles: a multi-process ring case that runs torch.compile (the slow ones; "
        "deselect with -m 'not compiles')",
    )
