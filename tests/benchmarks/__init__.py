"""Tests of ``subriemann.benchmarks``."""
