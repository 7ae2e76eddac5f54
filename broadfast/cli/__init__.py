"""The top floor: the ``broadfast`` console script, one module per component's commands."""
