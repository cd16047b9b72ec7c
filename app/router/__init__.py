"""The global endpoint (DESIGN: Shape): authenticates the client, resolves the account's home region from
the key and the shard map, and forwards with one pooled HTTP client per region."""
