"""One study end to end: screen, search, run, record and report, under a lease on its storage."""
