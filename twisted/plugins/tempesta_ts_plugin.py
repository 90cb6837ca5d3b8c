"""The twistd dropin: ``twistd -n tempesta-ts --config FILE``.

Imports nothing heavy: twistd loads every dropin to list the commands.
"""

from twisted.application.service import ServiceMaker

tempestaTS = ServiceMaker(
    "tempesta-ts",
    "tempesta_ts.tap",
    "Tempesta FW Troubleshooting Server: collects netconsole kernel logs",
    "tempesta-ts",
)
