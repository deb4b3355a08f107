"""Built-in tasks; importing a module registers its task."""

from toylens.data.tasks import (  # noqa: F401
    brackets,
    icl,
    induction,
    modular_add,
    prev_token,
    seq2seq,
    sequences,
)
