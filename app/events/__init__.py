"""Events and webhooks (DESIGN D16): the feed's cursor, Standard Webhooks signatures, URL rules and the
delivery worker."""
