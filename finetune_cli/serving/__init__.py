"""`ftune serve` (server.run): runs, adapters and models behind an OpenAI-compatible HTTP API.

served -> engine -> schema -> app -> server: what is served, the worker that decodes, the request bodies,
the HTTP app, the process.
"""
