"""The pure protocol core.

Nothing in this package imports twisted, treq, a database driver, the clock or
anything else that does I/O: it is data in, decisions out, so that every rule
of the protocol can be tested exhaustively without a reactor.
"""
