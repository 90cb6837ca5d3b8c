"""Tempesta FW Troubleshooting Server: collects the kernel logs of Tempesta FW instances."""

__version__ = "0.1.0"
