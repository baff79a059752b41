"""Where values live: registered columns, recorded locations, per-DEK usage, and the census report."""
