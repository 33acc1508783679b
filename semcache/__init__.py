"""The ``semcache`` command: the composition root that wires ``cache_core``, ``worker`` and ``web`` together.

``cache_core`` imports neither of the others, and ``worker`` and ``web`` never import each other; only this
package (the CLI) sees all three.
"""
