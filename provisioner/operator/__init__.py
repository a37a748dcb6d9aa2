"""Operator commands: publish, signing certificates, enroll, assign, status, revoke."""
