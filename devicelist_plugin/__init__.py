"""devicelist-plugin: Matrix device-list federation for Twisted homeservers."""

__version__ = "0.1.0"
