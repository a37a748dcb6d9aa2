"""Fixtures for the libvirt part of the test bed."""
