"""edgepin benchmarks (issue 8): ``python -m benchmarks`` or ``./build.sh bench``.

Every figure is a ratio against a baseline measured in the same run (this machine is
shared and noisy), with the absolute values beside it for context.
"""
