"""Client tokens (checked by the router), hop tokens (router -> region), saga tokens (region -> region) and
the keys behind them.

Tokens and keys never reach a log, an error body or a trace (DESIGN D8): errors here say what is wrong with
a token (expired, bad signature) and never echo it.
"""
