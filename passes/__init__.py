"""Graph rewrite passes, one per file. Installed as ``morphc.passes``.

Every pass follows one contract (see ``infra.py``): ``pass_(graph_module, ...) -> PassResult``.
Passes never import the runtime (``morphc.runtime.bypass``) and never touch training state.
"""
