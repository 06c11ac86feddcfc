"""Tests of ``subriemann.examples``."""
