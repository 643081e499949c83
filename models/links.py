"""How the channels of a network flow from the layers that make them to those that read them: what
`models.slim` needs to remove a pruned filter with everything that depends on it. Each architecture
describes its own links (`channel_links` in its module, named in the registry of `models/__init__.py`)."""


class Link:
    """Channels made by `producers` (concatenated in order) and read by `consumers`.

    A producer is `(module name, post-ops)`: the BatchNorm module names and 'relu' applied to its
    output before the consumers see it. A consumer is `(module name, multiplicity)`: a Linear after a
    flatten reads `multiplicity` features per channel. `residual`: the channels also feed a residual
    sum, so they keep their width (`BatchNormExpand`). `exact`: constants reach the consumers
    unchanged (False through an average pool with padding: only channels that hold 0 may go)."""

    def __init__(self, producers, consumers=(), residual=False, exact=True):
        self.producers, self.consumers, self.residual, self.exact = list(producers), list(consumers), residual, exact
