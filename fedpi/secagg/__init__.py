"""Secure aggregation (SecAgg+, Bell et al. 2020; SecAgg, Bonawitz et al. 2017, when every worker is a neighbour):
the pieces both ends share. Every cryptographic primitive comes from `cryptography`; Shamir's scheme is polynomial
arithmetic over a prime field, information-theoretic, and written here because `cryptography` has none."""


class OutOfOrder(Exception):
    """A stage asked for before its turn, twice in ways that differ, or for another round (FAILED_PRECONDITION)."""


class Unavailable(Exception):
    """This installation lacks `cryptography`, which comes with fedpi[secure] (and fedpi[privacy])."""


def require() -> None:
    """Unavailable, with what to install, unless secure aggregation can run here."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise Unavailable(
            "secure aggregation needs the `cryptography` package: install fedpi[secure] on this machine"
        ) from None
