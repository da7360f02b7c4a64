"""Built-in xai plugins, registered through the `xaicli` entry-point group like any third-party plugin."""
