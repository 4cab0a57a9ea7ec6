"""Fixtures for the tracking tests."""
