"""Which of several ranks' failures to report (every executor uses it; imports nothing of theirs)."""

# What a rank reports when it was only released by another rank's failure.
_SYMPTOMS = ("aborted", "timed out", "Connection closed")


def root_cause(failures: list[tuple[int, str]]) -> tuple[int, str]:
    """Of (rank, message) failures, the one to report: a rank that failed on its own comes before
    ranks that merely saw a collective aborted or closed under them."""
    return min(failures, key=lambda f: (any(s in f[1] for s in _SYMPTOMS), f[0]))
