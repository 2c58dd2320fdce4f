"""
Wire formats as pure code: bytes in, events out; events in, bytes out.
Nothing here imports Twisted or does I/O.
"""
