"""qup_ray: the Quality-Utility Paradox job suite."""

__version__ = "0.1.0"
