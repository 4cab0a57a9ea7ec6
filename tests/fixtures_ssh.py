"""Fixtures for the ssh tests."""
