"""The one exception type for configuration mistakes: it names the key and the fix."""


class ConfigError(ValueError):
    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}")
