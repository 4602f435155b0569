"""The reference server: the benchmark's protocol subset on plain aiohttp, state in a dict."""
