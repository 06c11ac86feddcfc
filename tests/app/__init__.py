"""Tests of ``subriemann.app``."""
