"""Persistence: tables, async repository functions and migrations. The core's only I/O."""
