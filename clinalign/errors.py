"""The errors every layer raises for bad input; `clinalign.config.run` prints them as one line, exit 2."""


class ClinalignError(Exception):
    """A problem with the user's input (config, data, model path): shown as one line, exit status 2."""


class ConfigError(ClinalignError):
    """A config key, value or file that cannot be used."""
