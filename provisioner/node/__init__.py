"""The node side: enroll, then reconcile (assignment, fetch, verify, keys, domain, report)."""
