"""The tools around the server: the command line, the demo, the simulation through the API and
the synthetic images. They may import ``app``, ``worker`` and ``ml``; ``app`` imports none of
them (``tests/test_architecture.py``)."""
