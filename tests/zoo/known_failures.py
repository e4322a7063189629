KNOWN_FAILURES: dict = {}
