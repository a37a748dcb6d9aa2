"""Fixtures for the tpm part of the test bed."""
