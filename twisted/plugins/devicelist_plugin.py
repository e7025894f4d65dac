"""twistd plugin: ``twistd -n devicelist``. Kept tiny so plugin discovery stays cheap."""

from twisted.application.service import ServiceMaker

devicelist = ServiceMaker(
    "devicelist",
    "devicelist_plugin.standalone.tap",
    "Matrix device-list federation server (devicelist-plugin)",
    "devicelist",
)
