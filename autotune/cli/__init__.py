"""The `autotune` command line (`app`, the console script's entry: autotune.cli:app)."""


def __getattr__(name: str):
    # The commands load only when the command line is asked for, not when a part of this package
    # (common, logs) is imported.
    if name == "app":
        from autotune.cli.main import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
