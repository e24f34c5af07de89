"""Subcommands of ``patchkit`` that work on a user's own checkpoint: ``bench`` and ``quantize``.

Each module offers ``add_parser(subparsers)``; ``patchkit.cli`` only wires them. Nothing here names
an architecture: the model class comes from the checkpoint's ``config.json``.
"""
