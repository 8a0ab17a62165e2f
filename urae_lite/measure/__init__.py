"""Measurement apart from estimation: the fake-tensor harness that runs the real generation and training code at full
FLUX.1 size on the CPU and counts the device bytes it keeps alive (fake.py), which tests and benchmarks hold the
planner (urae_lite/plan/) to. No runtime module imports it."""
