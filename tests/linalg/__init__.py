"""Tests of ``subriemann.linalg``."""
