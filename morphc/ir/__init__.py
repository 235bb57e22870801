"""What the graph is: tracing a model into a graph, the site table, node tags, the branch module.

The lowest layer above ``errors`` and ``families``: passes, the compiler and everything above read
these definitions; nothing here imports them.
"""
