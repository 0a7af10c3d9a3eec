"""The one error type users see.

This module is a leaf: every layer (models/, ops/, passes/, graphllm/) may import it. The CLI turns a
GraphllmError into one line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class GraphllmError(ValueError):
    """A problem with the user's input (flag, file, config, checkpoint); the message names it and the fix."""
