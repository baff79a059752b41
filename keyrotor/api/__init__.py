"""keyrotor over HTTP: `keyrotor serve` (aiohttp), its API tokens, errors and OpenAPI document."""
