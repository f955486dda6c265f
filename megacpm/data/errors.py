"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """A user-facing data problem (missing file, bad config value, corpus too small, ...).

    A ValueError: every such problem is a bad value in the data section of the config (or in
    the file it names), and callers that only know the builtin types can catch it as one.

    The message is one line that names the config key or file at fault, e.g.
    ``data.tokenizer: /x.json has 50000 token ids, more than model.vocab_size 8192``; the CLI prints
    it as is, without a traceback.
    """
