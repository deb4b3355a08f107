"""Built-in tasks; importing a module registers its task."""

from toylens.data.tasks import prev_token  # noqa: F401
