"""Errors that bayesfuse raises for bad input.

Every message is one line that names the offending file (or input) and the
problem, so that the command line can print it as is and exit non-zero.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: a file or array that cannot be fused as given.

    Parameters
    ----------
    source : str
        The file name or a description of the input ("rater 2", "--mask").
    problem : str
        What is wrong with it, in words a user can act on.
    """

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class ConfigError(ValueError):
    """An option value that the chosen method cannot use."""


class OutputExistsError(FileExistsError):
    """An output would overwrite a file and ``force`` was not given."""
