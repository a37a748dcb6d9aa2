"""edgepin: single-VM edge appliances on stock OpenStack."""

__version__ = "0.1.0"
