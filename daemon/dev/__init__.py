"""Developer tooling: the demo, embedded services for tests and benches, a tiny model, a sample corpus.

Never imported by the daemon process (tests/test_layout.py checks it).
"""
