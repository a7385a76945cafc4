"""Markers of this test suite."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compiles: a multi-process ring case that runs torch.compile (the slow ones; "
        "deselect with -m 'not compiles')",
    )
    # pytest-xdist registers it too; here for runs without it (`-o addopts='' -p no:xdist`)
    config.addinivalue_line(
        "markers", "xdist_group(name): tests sharing one expensive launch; pytest-xdist runs them in one worker",
    )
