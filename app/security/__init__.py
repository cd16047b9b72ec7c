"""Client tokens (checked by the router), internal hop tokens (router -> region) and the keys behind both.

Tokens and keys never reach a log, an error body or a trace (DESIGN D8): errors here say what is wrong with
a token (expired, bad signature) and never echo it.
"""
