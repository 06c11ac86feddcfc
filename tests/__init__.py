"""Test suite of subriemann (a package, so that tests can ``from tests.helpers import ...``)."""
