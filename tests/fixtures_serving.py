"""Fixtures for the serving tests."""
