"""The two moves: ``extend`` (insert bypass branches) and ``contract`` (fold them back), each
all-or-nothing, plus the ``ExtendedModel`` that carries the state between them."""
