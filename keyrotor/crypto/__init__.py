"""Byte formats: the ``kr1`` envelope and the old Node backend's legacy format. Pure and synchronous."""
