"""Tests of ``subriemann.space``."""
