"""Tests of ``subriemann.flow``."""
