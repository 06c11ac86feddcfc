"""Tests of ``subriemann.metrics``."""
