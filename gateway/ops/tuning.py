"""Process settings for a long-running server that makes many short-lived objects."""


def tune_gc() -> None:
    """
    Readings make many short-lived objects; with the default thresholds
    the collector runs full passes over every long-lived object (modules,
    connections, sessions) often enough to show in ack latency. Objects
    alive at start are frozen out of collection, and the youngest
    generation may grow larger before a pass.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
