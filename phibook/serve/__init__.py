"""The OpenAI-compatible HTTP server behind ``phibook serve``: the routes (server.py) and the
continuous-batching engine that owns the model (engine.py).
"""
