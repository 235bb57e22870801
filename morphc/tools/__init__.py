"""What people look at and type: ``inspect``, pictures, graph diffs, the ``morphc`` command, the
demo. The top layer: nothing below imports it."""
