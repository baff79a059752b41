"""The queue contract between applications, the scheduler and the workers: job ids, enqueueing,
JSON payloads, and the enqueue client (``KeyrotorClient``). The only part of the library that imports arq."""
