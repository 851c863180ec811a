"""Things that are not apps, for the error-message tests."""

app = 42


def no_args():
    return None
