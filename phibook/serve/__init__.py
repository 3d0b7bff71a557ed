"""The OpenAI-compatible HTTP server (server.py) behind ``phibook serve``.
"""
