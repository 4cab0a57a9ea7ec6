"""Fixtures for the monitor tests."""
