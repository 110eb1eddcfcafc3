"""pytest-benchmark over the suite's cases: ``pytest benchmarks/ --benchmark-only [--bench-full]``."""


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true",
                     help="every case of python -m benchmarks (default: the --quick selection)")
