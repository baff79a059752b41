"""Regional copies of the DEKs: the regions, the hourly check and repair, and promotion."""
