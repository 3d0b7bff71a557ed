"""One module per CLI verb. Each defines ``register(subparsers)`` which adds its
parser and sets ``func`` to a ``run(args) -> int`` function. Modules import
heavy libraries (torch) inside ``run`` so that ``phibook --help`` stays fast."""
