"""Hypothesis fuzzing of the plugin's HTTP endpoints and the X-Matrix parser.

Every module drives the real Twisted resources in memory (no sockets) and
checks, for every generated request: no 5xx and nothing logged as an error;
a JSON body with an ``errcode`` for every error; a rejected request changes
nothing in the store and makes no outbound federation request; and, for
``/send``, that accepted EDU sequences still let the receiver's cache
converge on the sender's true device list.

The number of examples per target is ``FUZZ_EXAMPLES`` (see
:mod:`tests.fuzz.common`); a long run::

    FUZZ_EXAMPLES=5000 PYTHONPATH=. trial tests.fuzz
"""
