"""Tests of ``subriemann.analysis``."""
