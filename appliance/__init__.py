"""Edge inference appliance for dermatology clinics."""

__version__ = "0.1.0"
