"""Code shared by the fedpi worker and coordinator: protocol versions, weight serde, models, data."""

__version__ = "0.1.0"
