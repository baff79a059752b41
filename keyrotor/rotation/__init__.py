"""Key rotation: the eight DEK steps, re-encryption, retirement and destruction, KEK rotation
and migration."""
