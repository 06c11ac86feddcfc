"""Tests of ``subriemann.engines``."""
