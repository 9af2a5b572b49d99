"""The one exception type the libraries raise for bad user input."""


class InputError(ValueError):
    """Bad or unusable input (file, volume, landmarks, model). The message is one line for the user."""
