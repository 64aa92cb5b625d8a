"""Small shared test doubles (importable from tests: pytest puts this folder on sys.path)."""


class TinyData:
    """A one-batch classification data bundle: the interface stages read from `ctx.data`."""

    task = "classification"
    num_classes = 3

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.calib = self.train = self.test = [(x, y)]

    def example_batch(self, n):
        return self.x[:n]
