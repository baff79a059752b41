"""arq job bodies: thin, idempotent async functions over the keyrotor library."""
