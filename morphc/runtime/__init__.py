"""Bypass inside a training loop: triggers, the extend → bypass → return → contract cycle, and the
small facade users call (``morphc.Bypass``)."""
