"""keyrotor's processes: the arq worker, the scheduler, the enqueue client and the CLI."""
