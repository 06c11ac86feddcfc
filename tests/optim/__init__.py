"""Tests of ``subriemann.optim``."""
