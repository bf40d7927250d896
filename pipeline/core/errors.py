"""The one exception type for bad input: the CLI prints it as a single line, no traceback."""


class PipelineError(Exception):
    """A problem the user can fix (bad file, missing artifact, bad config).

    The message names the file and the problem in one line.
    """
