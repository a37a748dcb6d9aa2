"""Fixtures for the controlplane part of the test bed."""
