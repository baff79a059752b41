"""Rotation policies and the scheduler's scans: what is due, and when."""
